"""The registered templates: kept in the store, read from memory."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from services.deploy_kubernetes.errors import NoTemplateError, NotReadyError
from services.deploy_kubernetes.models import Template, check_name
from services.deploy_kubernetes.store import Store


class Catalog:
    def __init__(self, *, store: Store, changed: asyncio.Event) -> None:
        self._store = store
        self._templates: dict[str, Template] = {}
        self._loaded = False
        self._changed = changed
        """Set whenever a template changes (the pools look again)."""

    async def load(self, seeds: list[Template]) -> None:
        """Write the shipped templates, then read every registered one."""
        for template in seeds:
            await self._store.put_template(template)
        self._templates = {t.name: t for t in await self._store.list_templates()}
        self._loaded = True

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise NotReadyError("the deploy server is starting; try again in a moment")

    def get(self, name: str) -> Template:
        check_name(name)
        self._require_loaded()
        template = self._templates.get(name)
        if template is None:
            raise NoTemplateError(f"no template named {name}")
        return template

    def find(self, name: str) -> Template | None:
        return self._templates.get(name)

    def all(self) -> list[Template]:
        self._require_loaded()
        return list(self._templates.values())

    async def put(self, template: Template) -> None:
        await self._store.put_template(template)
        self._templates[template.name] = template
        self._changed.set()

    async def resize_pool(self, name: str, size: int) -> Template:
        template = replace(self.get(name), pool_size=size)
        await self.put(template)
        return template

    async def delete(self, name: str) -> None:
        self.get(name)
        await self._store.delete_template(name)
        self._templates.pop(name, None)
        self._changed.set()
