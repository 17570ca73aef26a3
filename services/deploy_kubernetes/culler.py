"""Culling by real inactivity (the proxy's per-route ``last_activity``) and by maximum age."""

from __future__ import annotations

from datetime import datetime

from common.background import repeat
from common.proxy import Proxy
from services.deploy_kubernetes.ending import Ender
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status, now
from services.deploy_kubernetes.records import Records
from services.deploy_kubernetes.store import Change


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
    def __init__(
        self,
        *,
        records: Records,
        proxy: Proxy,
        ender: Ender,
        metrics: Metrics,
        interval: float,
        max_age_seconds: float,
    ) -> None:
        self._records = records
        self._proxy = proxy
        self._ender = ender
        self._metrics = metrics
        self.interval = interval
        self.max_age = max_age_seconds

    async def run(self) -> None:
        await repeat(self.cull_once, every=self.interval, what="culling", delay_first=True)

    async def cull_once(self) -> int:
        routes = await self._proxy.routes()
        at = now()
        culled = 0
        for dep in await self._records.find(statuses=[Status.DEPLOYED], pooled=False):
            last = routes.get(dep.route, ("", None))[1]
            if last is not None and (dep.last_activity is None or last > dep.last_activity):
                dep = await self._records.update(dep.id, Change(last_activity=last)) or dep
            reason = cull_reason(dep, last, at, self.max_age)
            if reason:
                self._metrics.culls.labels(why="age" if "age" in reason else "idle").inc()
                await self._ender.delete(dep, reason)
                culled += 1
        return culled
