"""Reconciliation of the records that are not final against the backend and the proxy, by the
leader: in full when it begins its term and every 30 s, and every 2 s the launches of servers
that stopped beating.

- a ``deploying`` record is left to its owner while the owner beats; one whose owner stopped (it
  died, or stalled past its lease) is adopted (the record names this server) and resumed, waiting
  on its object or launching it again, within the launch timeout the launch itself enforces; one
  that outlives the launch timeout on a live owner is failed;
- ``deployed`` records whose object runs get their route back (in this host's proxy; each host's
  route keeper sees to its own); the others become ``failed``;
- backend objects and ``/user/`` routes without a live record are removed once they have been
  seen so for :data:`ORPHAN_GRACE_SECONDS` (a launch on another server starts its object while
  its record is being written), never those of a launch this server runs: its record may take
  longer than that to land (a write conflicting with a dead server's transaction waits for the
  database to roll it back), and removing its app then left a record ``deployed`` with no app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from loguru import logger

from common.background import repeat
from common.proxy import Proxy, ProxyRoute
from services.deploy_kubernetes.backends.base import Backend, Observed, State
from services.deploy_kubernetes.engine.catalog import Catalog
from services.deploy_kubernetes.engine.ending import Ender
from services.deploy_kubernetes.engine.launcher import Launcher
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Deployment, Status, now
from services.deploy_kubernetes.store.base import ACTIVE, Change, Leases

ORPHAN_GRACE_SECONDS = 2.0
ADOPT_EVERY_SECONDS = 2.0
FULL_EVERY_ROUNDS = 15
"""Every this many rounds the leader reconciles in full (every 30 s)."""


@dataclass(frozen=True, kw_only=True)
class Reconciler:
    records: Records
    catalog: Catalog
    backend: Backend
    proxy: Proxy
    launcher: Launcher
    ender: Ender
    leases: Leases
    server: str
    """This server's id (the owner it writes on what it adopts)."""
    beat_seconds: float
    """A server that has not beaten for this long is taken for gone."""

    async def run(self) -> dict[str, int]:
        """Reconcile every record that is not final; returns what was done, counted."""
        objects = {obs.id: obs for obs in await self.backend.list()}
        routes = await self.proxy.routes()
        live = await self.records.find(statuses=ACTIVE, pooled=None)
        alive = await self.leases.alive(within=self.beat_seconds)
        counts = dict.fromkeys(
            ("resumed", "elsewhere", "restored", "failed", "orphans", "stale_routes"), 0
        )
        for dep in live:
            outcome = await self._one(dep, objects.get(dep.id), routes, alive)
            counts[outcome] += 1
        known = {dep.id for dep in live}
        orphans = [obs for obs in objects.values() if not self._accounted(obs.id, known)]
        stale = [p for p in routes if p.startswith("/user/") and not self._accounted(p[6:], known)]
        if orphans or stale:
            await asyncio.sleep(ORPHAN_GRACE_SECONDS)
        for obs in orphans:
            if await self._gone(obs.id):
                await self.backend.stop(obs.id, obs.ref)
                counts["orphans"] += 1
        for path in stale:
            if await self._gone(path.removeprefix("/user/")):
                await self.proxy.remove_route(path)
                counts["stale_routes"] += 1
        logger.info("reconciled: {}", ", ".join(f"{k} {v}" for k, v in counts.items()))
        return counts

    def _accounted(self, dep_id: str, known: set[str]) -> bool:
        """Whether ``dep_id`` has a live record, or is a launch of this server."""
        return dep_id in known or self.launcher.running(dep_id)

    async def _gone(self, dep_id: str) -> bool:
        """Whether ``dep_id`` has no live record (read again, after the grace) and is not a
        launch of this server."""
        if self.launcher.running(dep_id):
            return False
        dep = await self.records.get(dep_id)
        return dep is None or dep.status.final

    async def _one(
        self,
        dep: Deployment,
        obs: Observed | None,
        routes: Mapping[str, ProxyRoute],
        alive: set[str],
    ) -> str:
        if dep.status is Status.DEPLOYING:
            if self.launcher.running(dep.id) or (dep.owner in alive and dep.owner != self.server):
                return "elsewhere"
            return await self._adopt(dep, obs)
        if obs is None or obs.state is State.EXITED:
            why = obs.reason if obs is not None and obs.reason else "its app vanished"
            await self.ender.fail(dep, f"{why} while its deploy server was down")
            return "failed"
        route = routes.get(dep.route)
        if obs.target and (route is None or route.target != obs.target):
            await self.proxy.add_route(dep.route, obs.target)
            if obs.target != dep.target:
                await self.records.update(dep.id, Change(target=obs.target))
        return "restored"

    async def _adopt(self, dep: Deployment, obs: Observed | None) -> str:
        """Go on with the launch of a server that is gone (or of this one before a restart)."""
        template = self.catalog.find(dep.template)
        if template is None:
            reason = f"template {dep.template} was removed while the server was down"
            await self.ender.fail(dep, reason)
            return "failed"
        adopted = await self.records.update(dep.id, Change(owner=self.server))
        if adopted is None or adopted.status is not Status.DEPLOYING:
            return "elsewhere"
        running = obs if obs is not None and obs.state is not State.EXITED else None
        if obs is not None and running is None:
            await self.backend.stop(dep.id, obs.ref)
        logger.bind(id=dep.id).info("launch adopted from server {}", dep.owner or "unknown")
        self.launcher.resume(adopted, template, running)
        return "resumed"

    async def adopt_once(self) -> int:
        """Adopt the launches of servers that stopped beating; fail those that outlived the
        launch timeout on a live server. Returns how many were adopted or failed."""
        deploying = [
            d
            for d in await self.records.find(statuses=[Status.DEPLOYING], pooled=None)
            if not self.launcher.running(d.id)
        ]
        if not deploying:
            return 0
        alive = await self.leases.alive(within=self.beat_seconds)
        hung = timedelta(seconds=self.launcher.timeout + 10)
        done = 0
        objects: dict[str, Observed] | None = None
        for dep in deploying:
            if dep.owner in alive and dep.owner != self.server:
                if now() - dep.created > hung:
                    reason = f"timed out after {self.launcher.timeout:g} s (launch was interrupted)"
                    await self.ender.fail(dep, reason)
                    done += 1
                continue
            if objects is None:
                objects = {obs.id: obs for obs in await self.backend.list()}
            await self._adopt(dep, objects.get(dep.id))
            done += 1
        return done

    async def keep(self) -> None:
        """The leader's loop: reconcile in full once, then adopt every
        :data:`ADOPT_EVERY_SECONDS`, for ever."""
        while True:
            try:
                await self.run()
                break
            except BinderError as exc:
                logger.warning("reconcile skipped: {}", exc.message)
            await asyncio.sleep(1.0)
        rounds = 0

        async def step() -> None:
            nonlocal rounds
            rounds += 1
            if rounds % FULL_EVERY_ROUNDS:
                await self.adopt_once()
            else:  # what a server that died left: an app without a record, a vanished app
                await self.run()

        await repeat(step, every=ADOPT_EVERY_SECONDS, what="adopting launches", delay_first=True)
