"""Culling by real inactivity (the proxy's per-route ``last_activity``) and by maximum age, and
the keeper that puts routes back after a proxy restart and fails launches that hang."""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio
from loguru import logger

from common.background import repeat
from services.deploy_kubernetes.deployer import Deployer
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Deployment, Status, now


def cull_reason(
    dep: Deployment, last_activity: datetime | None, at: datetime, max_age_seconds: float
) -> str | None:
    """Why ``dep`` should be culled at ``at``, or None. Pure, so it is tested on its own."""
    if dep.pooled or dep.status is not Status.DEPLOYED:
        return None
    if (at - dep.created).total_seconds() > max_age_seconds:
        return f"culled at the maximum age of {max_age_seconds:g} s"
    last = max(t for t in (last_activity, dep.deployed_at, dep.created) if t is not None)
    idle = (at - last).total_seconds()
    if idle * 1000 > dep.cull_timeout_ms:
        return f"culled after {idle:.0f} s of inactivity"
    return None


class Culler:
    def __init__(self, deployer: Deployer, *, interval: float, max_age_seconds: float) -> None:
        self.deployer = deployer
        self.interval = interval
        self.max_age = max_age_seconds

    async def run(self) -> None:
        await repeat(self.cull_once, every=self.interval, what="culling", delay_first=True)

    async def cull_once(self) -> int:
        d = self.deployer
        routes = await d.proxy.routes()
        at = now()
        culled = 0
        for dep in await d.store.find(statuses=[Status.DEPLOYED], pooled=False):
            last = routes.get(dep.route, ("", None))[1]
            if last is not None and (dep.last_activity is None or last > dep.last_activity):
                dep = await d.store.update(dep.id, last_activity=last) or dep
                d._remember(dep)
            reason = cull_reason(dep, last, at, self.max_age)
            if reason:
                d.metrics.culls.labels(why="age" if "age" in reason else "idle").inc()
                await d.delete(dep.template, dep.id, reason=reason)
                culled += 1
        return culled


class Keeper:
    """Every few seconds: routes of deployed apps present, hung launches failed, gauges set."""

    def __init__(self, deployer: Deployer, *, interval: float = 2.0) -> None:
        self.deployer = deployer
        self.interval = interval
        self.healthy: dict[str, str] = {
            "database": "unknown",
            "proxy": "unknown",
            "backend": "unknown",
        }

    async def run(self) -> None:
        while True:
            await self.check_once()
            await anyio.sleep(self.interval)

    async def check_once(self) -> None:
        d = self.deployer
        self.healthy["database"] = await _probe(d.store.ping())
        self.healthy["proxy"] = await _probe(d.proxy.ping())
        self.healthy["backend"] = await _probe(d.backend.ping())
        if self.healthy["database"] != "ok":
            return
        try:
            active = await d.store.find(statuses=[Status.DEPLOYING, Status.DEPLOYED], pooled=None)
            counts = {s.value: 0 for s in Status}
            for dep in active:
                counts[dep.status.value] += 0 if dep.pooled else 1
            for status, count in counts.items():
                d.metrics.deployments.labels(status=status).set(count)
            if self.healthy["proxy"] == "ok":
                await self._restore_routes(active)
            await self._fail_hung(active)
        except BinderError as exc:
            logger.warning("keeper check incomplete: {}", exc.message)

    async def _restore_routes(self, active: list[Deployment]) -> None:
        d = self.deployer
        routes = await d.proxy.routes()
        for dep in active:
            if (
                dep.status is Status.DEPLOYED
                and dep.target
                and routes.get(dep.route, ("",))[0] != dep.target
            ):
                logger.bind(id=dep.id).info("route missing in the proxy; adding it again")
                await d.proxy.add_route(dep.route, dep.target)

    async def _fail_hung(self, active: list[Deployment]) -> None:
        d = self.deployer
        limit = timedelta(seconds=d.launch_timeout + 10)
        for dep in active:
            if (
                dep.status is Status.DEPLOYING
                and not d.launching(dep.id)
                and now() - dep.created > limit
            ):
                await d.fail(
                    dep, f"timed out after {d.launch_timeout:g} s (launch was interrupted)"
                )


async def _probe(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except BinderError as exc:
        return exc.message
    return "ok"
