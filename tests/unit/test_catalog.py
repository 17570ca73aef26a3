"""The template files seed the store at every start without undoing the operator's changes made
through the API since (a pool resized with ``PUT /pools``), while a file's own later edits apply."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import anyio
from fakes import FakeStore

from services.deploy_kubernetes.engine.catalog import Catalog
from services.deploy_kubernetes.models import Template

FILE = Template(name="web", command=("run", "{port}"), pool_size=0)


async def _started(store: FakeStore, *seeds: Template) -> Catalog:
    """A deploy server's catalog at start, over what ``store`` holds."""
    catalog = Catalog(store=store, changed=asyncio.Event())
    await catalog.load(list(seeds))
    return catalog


def test_a_resized_pool_keeps_its_size_across_restarts() -> None:
    async def main() -> None:
        store = FakeStore()
        await (await _started(store, FILE)).resize_pool("web", 3)
        assert (await _started(store, FILE)).get("web").pool_size == 3
        assert (await _started(store, FILE)).get("web").pool_size == 3  # and the one after

    anyio.run(main)


def test_a_template_file_edited_since_still_applies_what_it_changed() -> None:
    async def main() -> None:
        store = FakeStore()
        await (await _started(store, FILE)).resize_pool("web", 3)
        moved = replace(FILE, command=("serve", "{port}"))
        restarted = (await _started(store, moved)).get("web")
        assert restarted.command == ("serve", "{port}")  # the file changed it
        assert restarted.pool_size == 3  # the operator's, the file left it alone
        resized_in_file = replace(moved, pool_size=5)
        assert (await _started(store, resized_in_file)).get("web").pool_size == 5

    anyio.run(main)
