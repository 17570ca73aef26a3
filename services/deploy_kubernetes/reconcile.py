"""Start-up reconciliation: records that are not final against the backend and the proxy.

- ``deploying`` records are resumed (waiting on their object, or launching it again) within the
  launch timeout, which the launch itself enforces;
- ``deployed`` records whose object runs get their route back; the others become ``failed``;
- backend objects and ``/user/`` routes without a live record are removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from loguru import logger

from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend, Observed, State
from services.deploy_kubernetes.catalog import Catalog
from services.deploy_kubernetes.ending import Ender
from services.deploy_kubernetes.launcher import Launcher
from services.deploy_kubernetes.models import Deployment, Status
from services.deploy_kubernetes.records import Records
from services.deploy_kubernetes.store import Change


@dataclass(frozen=True)
class Reconciler:
    records: Records
    catalog: Catalog
    backend: Backend
    proxy: Proxy
    launcher: Launcher
    ender: Ender

    async def run(self, live: list[Deployment]) -> dict[str, int]:
        """Reconcile the ``live`` (not final) records; returns what was done, counted."""
        objects = {obs.id: obs for obs in await self.backend.list()}
        routes = await self.proxy.routes()
        counts = {"resumed": 0, "restored": 0, "failed": 0, "orphans": 0, "stale_routes": 0}
        for dep in live:
            outcome = await self._one(dep, objects.get(dep.id), routes)
            counts[outcome] += 1
        known = {dep.id for dep in live}
        for obs in objects.values():
            if obs.id not in known:
                await self.backend.stop(obs.id, obs.ref)
                counts["orphans"] += 1
        for path in routes:
            if path.startswith("/user/") and path.removeprefix("/user/") not in known:
                await self.proxy.remove_route(path)
                counts["stale_routes"] += 1
        logger.info("reconciled: {}", ", ".join(f"{k} {v}" for k, v in counts.items()))
        return counts

    async def _one(
        self, dep: Deployment, obs: Observed | None, routes: Mapping[str, tuple[str, object]]
    ) -> str:
        if dep.status is Status.DEPLOYING:
            template = self.catalog.find(dep.template)
            if template is None:
                reason = f"template {dep.template} was removed while the server was down"
                await self.ender.fail(dep, reason)
                return "failed"
            running = obs if obs is not None and obs.state is not State.EXITED else None
            if obs is not None and running is None:
                await self.backend.stop(dep.id, obs.ref)
            self.launcher.resume(dep, template, running)
            return "resumed"
        if obs is None or obs.state is State.EXITED:
            why = obs.reason if obs is not None and obs.reason else "its app vanished"
            await self.ender.fail(dep, f"{why} while the deploy server was down")
            return "failed"
        if obs.target and routes.get(dep.route, ("",))[0] != obs.target:
            await self.proxy.add_route(dep.route, obs.target)
            if obs.target != dep.target:
                await self.records.update(dep.id, Change(target=obs.target))
        return "restored"
