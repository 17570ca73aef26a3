"""The registered templates: kept in the store, read from memory.

The template files (``configs/templates/*.toml``) seed the store at every start, and operators
change registered templates through the API (a pool resized with ``PUT /pools/<template>``). A
file does not undo those changes: each field takes the file's value when the file changed it
since it last seeded the template, and otherwise keeps the stored one (:func:`merge_seed`). The
store keeps, beside each template, the file's version that last seeded it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from services.deploy_kubernetes.errors import NoTemplateError, NotReadyError
from services.deploy_kubernetes.models import Template, check_name, parse_template
from services.deploy_kubernetes.store.base import Store


def merge_seed(seed: Template, *, stored: Template | None, last: Template | None) -> Template:
    """What template file ``seed`` registers, over ``stored`` (the registered template) when
    ``last`` (the file's version that last seeded it) tells what the operator changed since:
    a field the file changed since ``last`` takes the file's value; any other keeps the stored
    one. Without both (a new template, or one stored before seeds were kept), the file's."""
    if stored is None or last is None:
        return seed
    new, was, now = seed.to_api(), last.to_api(), stored.to_api()
    merged = {
        k: new.get(k) if new.get(k) != was.get(k) else now.get(k) for k in new.keys() | now.keys()
    }
    return parse_template({k: v for k, v in merged.items() if v is not None}, name=seed.name)


class Catalog:
    def __init__(self, *, store: Store, changed: asyncio.Event) -> None:
        self._store = store
        self._templates: dict[str, Template] = {}
        self._loaded = False
        self._changed = changed
        """Set whenever a template changes (the pools look again)."""

    async def load(self, seeds: list[Template]) -> None:
        """Write the template files' templates (keeping the operator's changes, see the
        module's docstring), then read every registered one."""
        stored = {t.name: t for t in await self._store.list_templates()}
        last = await self._store.seeded_templates()
        for seed in seeds:
            template = merge_seed(seed, stored=stored.get(seed.name), last=last.get(seed.name))
            await self._store.put_template(template, seeded=seed)
        self._templates = {t.name: t for t in await self._store.list_templates()}
        self._loaded = True

    async def reload(self) -> None:
        """Read every registered template again (another server changed one)."""
        self._templates = {t.name: t for t in await self._store.list_templates()}
        self._changed.set()

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
