"""Pre-launched pools: ``pool-size`` instances of a template wait deployed, so that a launch
takes one at once; the pool refills in the background."""

from __future__ import annotations

import anyio
from loguru import logger

from services.deploy_kubernetes.deployer import Deployer
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Status


class Pools:
    def __init__(self, deployer: Deployer) -> None:
        self.deployer = deployer

    async def state(self, template_name: str) -> dict[str, object]:
        d = self.deployer
        template = d.template(template_name)
        pooled = await d.store.find(
            template=template.name, pooled=True, statuses=[Status.DEPLOYING, Status.DEPLOYED]
        )
        ready = sum(1 for p in pooled if p.status is Status.DEPLOYED)
        return {
            "template-name": template.name,
            "size": template.pool_size,
            "ready": ready,
            "starting": len(pooled) - ready,
        }

    async def resize(self, template_name: str, size: int) -> dict[str, object]:
        d = self.deployer
        template = d.template(template_name)
        await d.put_template(template.__class__(**{**template.__dict__, "pool_size": size}))
        await self.refill_once()
        return await self.state(template_name)

    async def run(self) -> None:
        d = self.deployer
        while True:
            try:
                await self.refill_once()
            except BinderError as exc:
                logger.warning("pool refill skipped: {}", exc.message)
            with anyio.move_on_after(5.0):
                await d.pool_wakeup.wait()
            d.pool_wakeup.clear()

    async def refill_once(self) -> None:
        d = self.deployer
        pooled = await d.store.find(pooled=True, statuses=[Status.DEPLOYING, Status.DEPLOYED])
        by_template: dict[str, list[str]] = {}
        for dep in pooled:
            by_template.setdefault(dep.template, []).append(dep.id)
        for name, template in list(d.templates.items()):
            have = by_template.pop(name, [])
            ready = sum(1 for p in pooled if p.template == name and p.status is Status.DEPLOYED)
            d.metrics.pooled.labels(template=name).set(ready)
            for _ in range(template.pool_size - len(have)):
                await d.launch_pooled(template)
            for dep_id in have[template.pool_size :]:  # the pool shrank
                await self._retire(dep_id)
        for ids in by_template.values():  # templates that were removed
            for dep_id in ids:
                await self._retire(dep_id)

    async def _retire(self, dep_id: str) -> None:
        d = self.deployer
        dep = await d.store.get(dep_id)
        if dep is not None and not dep.status.final:
            await d.end(dep, Status.DELETED, "retired from the pool")
