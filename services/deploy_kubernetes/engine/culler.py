"""Culling by real inactivity (the proxy's per-route ``last_activity``, and the app's own where
its template names an ``activity-path``: :mod:`.activity`) and by maximum age."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import anyio

from common.background import repeat
from common.proxy import Proxy
from services.deploy_kubernetes.engine.activity import AppActivity
from services.deploy_kubernetes.engine.catalog import Catalog
from services.deploy_kubernetes.engine.ending import Ender
from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Deployment, Status, Template, now
from services.deploy_kubernetes.store.base import Change

IDLE_CULL = "culled after"
"""How the reason of a deployment culled for inactivity starts."""
AGE_CULL = "culled at the maximum age"
"""How the reason of a deployment culled at its maximum age starts."""


def cull_reason(
    dep: Deployment, last_activity: datetime | None, at: datetime, max_age_seconds: float
) -> str | None:
    """Why ``dep`` should be culled at ``at``, or None. Pure, so it is tested on its own."""
    if dep.pooled or dep.status is not Status.DEPLOYED:
        return None
    if (at - dep.created).total_seconds() > max_age_seconds:
        return f"{AGE_CULL} of {max_age_seconds:g} s"
    last = max(t for t in (last_activity, dep.deployed_at, dep.created) if t is not None)
    idle = (at - last).total_seconds()
    if idle * 1000 > dep.cull_timeout_ms:
        return f"{IDLE_CULL} {idle:.0f} s of inactivity"
    return None


AppReader = Callable[[Deployment, Template], Awaitable[datetime | None]]
"""The app's own last activity (:class:`AppActivity`), or None where it tells none."""
APP_READS_AT_ONCE = 16


class Culler:
    def __init__(
        self,
        *,
        records: Records,
        catalog: Catalog,
        proxy: Proxy,
        ender: Ender,
        metrics: Metrics,
        interval: float,
        max_age_seconds: float,
        app_activity: AppReader | None = None,
    ) -> None:
        self._records = records
        self._catalog = catalog
        self._app_activity = app_activity or AppActivity().last_activity
        self._proxy = proxy
        self._ender = ender
        self._metrics = metrics
        self.interval = interval
        self.max_age = max_age_seconds

    async def run(self) -> None:
        await repeat(self.cull_once, every=self.interval, what="culling", delay_first=True)

    async def cull_once(self) -> int:
        routes = await self._proxy.routes()
        deployed = await self._records.find(statuses=[Status.DEPLOYED], pooled=False)
        own = await self._apps_own(deployed)
        at = now()
        culled = 0
        for dep in deployed:
            route = routes.get(dep.route)
            told = [route.last_activity if route is not None else None, own.get(dep.id)]
            last = max((t for t in told if t is not None), default=None)
            if last is not None and (dep.last_activity is None or last > dep.last_activity):
                dep = await self._records.update(dep.id, Change(last_activity=last)) or dep
            reason = cull_reason(dep, last, at, self.max_age)
            if reason:
                self._metrics.culls.labels(why="age" if "age" in reason else "idle").inc()
                await self._ender.delete(dep, reason)
                culled += 1
        return culled

    async def _apps_own(self, deps: list[Deployment]) -> dict[str, datetime]:
        """The last activity the apps tell of themselves, by id (a few read at once)."""
        found: dict[str, datetime] = {}
        limit = anyio.Semaphore(APP_READS_AT_ONCE)

        async def read(dep: Deployment, template: Template) -> None:
            async with limit:
                when = await self._app_activity(dep, template)
            if when is not None:
                found[dep.id] = when

        async with anyio.create_task_group() as tasks:
            for dep in deps:
                try:
                    template = self._catalog.get(dep.template)
                except BinderError:  # removed since: the proxy's count alone
                    continue
                if template.activity_path:
                    tasks.start_soon(read, dep, template)
        return found
