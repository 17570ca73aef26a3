"""Pre-launched pools: ``pool-size`` instances of a template wait deployed, so that a launch
takes one at once (:meth:`Records.claim_pooled`); the pool refills in the background, its missing
instances started together, as many as the server has room for."""

from __future__ import annotations

import asyncio

import anyio
from loguru import logger

from services.deploy_kubernetes.engine.catalog import Catalog
from services.deploy_kubernetes.engine.ending import Ender
from services.deploy_kubernetes.engine.launcher import Launcher
from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Deployment, Status, Template
from services.deploy_kubernetes.store.base import ACTIVE

STARTS_PER_ROUND = 50
"""Pooled instances started in one round at most (a pool of 1,000 fills over rounds)."""


class Pools:
    def __init__(
        self,
        *,
        records: Records,
        catalog: Catalog,
        launcher: Launcher,
        ender: Ender,
        metrics: Metrics,
        changed: asyncio.Event,
    ) -> None:
        self._records = records
        self._catalog = catalog
        self._launcher = launcher
        self._ender = ender
        self._metrics = metrics
        self._changed = changed
        self._refilling = asyncio.Lock()
        """One refill at a time (the loop's and a resize's), so none starts an instance twice."""
        self._none_pooled = False
        """A refill found no pooled instance while no template wanted one. Only refills start
        pooled instances, so the next ones need no database read (one per launch that ends,
        otherwise) until a template has a pool again."""

    async def state(self, template_name: str) -> dict[str, object]:
        template = self._catalog.get(template_name)
        pooled = await self._records.find(template=template.name, pooled=True, statuses=ACTIVE)
        ready = sum(1 for p in pooled if p.status is Status.DEPLOYED)
        return {
            "template-name": template.name,
            "size": template.pool_size,
            "ready": ready,
            "starting": len(pooled) - ready,
        }

    async def resize(self, template_name: str, size: int) -> dict[str, object]:
        await self._catalog.resize_pool(template_name, size)
        await self.refill_once()
        return await self.state(template_name)

    async def run(self) -> None:
        """Refill on every change, and every 5 s; a passing outage skips a round."""
        while True:
            try:
                await self.refill_once()
            except BinderError as exc:
                logger.warning("pool refill skipped: {}", exc.message)
            with anyio.move_on_after(5.0):
                await self._changed.wait()
            self._changed.clear()

    async def refill_once(self) -> None:
        async with self._refilling:
            await self._refill()

    async def _refill(self) -> None:
        wanted = any(t.pool_size for t in self._catalog.all())
        if self._none_pooled and not wanted:
            for template in self._catalog.all():
                self._metrics.pooled.labels(template=template.name).set(0)
            return
        pooled = await self._records.find(pooled=True, statuses=ACTIVE)
        self._none_pooled = not pooled and not wanted
        by_template: dict[str, list[Deployment]] = {}
        for dep in pooled:
            by_template.setdefault(dep.template, []).append(dep)
        missing: list[Template] = []
        for template in self._catalog.all():
            have = by_template.pop(template.name, [])
            ready = sum(1 for p in have if p.status is Status.DEPLOYED)
            self._metrics.pooled.labels(template=template.name).set(ready)
            missing += [template] * (template.pool_size - len(have))
            await self._retire(have[template.pool_size :])  # the pool shrank
        for deps in by_template.values():  # templates that were removed
            await self._retire(deps)
        async with anyio.create_task_group() as tasks:  # together, as room allows
            for template in missing[:STARTS_PER_ROUND]:
                tasks.start_soon(self._start, template)

    async def _start(self, template: Template) -> None:
        try:
            await self._launcher.launch_pooled(template)
        except BinderError as exc:  # the next round tries again
            logger.bind(template=template.name).warning("pool start skipped: {}", exc.message)

    async def _retire(self, deps: list[Deployment]) -> None:
        for dep in deps:
            if self._records.withdraw(dep):  # not if a launch has just claimed it
                await self._ender.delete(dep, "retired from the pool")
