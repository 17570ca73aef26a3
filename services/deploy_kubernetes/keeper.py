"""The keeper: every few seconds it looks at the database, the proxy and the backend (each look
bounded by a deadline, so a frozen dependency shows as down instead of hanging), puts routes of
deployed apps back after a proxy restart, fails launches that hang, and sets the gauges.

The proxy keeps routes in memory only. The keeper learns of its restart without listing every
route: it keeps one sentinel route of its own there and asks for that one alone each time; when
it is gone, the proxy has started afresh, and the routes are listed and put back once.

Those three looks are cheap and made every round. The deployments themselves (the gauges, hung
launches) are read every few rounds only, and at once when the proxy's routes must be put back:
the gauges are scraped far less often than that, and a launch counts as hung only long after its
own timeout."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
from loguru import logger

from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend
from services.deploy_kubernetes.ending import Ender
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.launcher import Launcher
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status, now
from services.deploy_kubernetes.records import Records
from services.deploy_kubernetes.store import ACTIVE

CHECK_DEADLINE_SECONDS = 1.5
SWEEP_EVERY_ROUNDS = 5
"""Rounds between two reads of the active deployments (gauges, hung launches)."""
SENTINEL_ROUTE = "/_binder-keeper"
SENTINEL_TARGET = "http://127.0.0.1:9"
"""Where the sentinel route points: nothing listens there (the discard port)."""


class Keeper:
    def __init__(
        self,
        *,
        records: Records,
        backend: Backend,
        proxy: Proxy,
        launcher: Launcher,
        ender: Ender,
        metrics: Metrics,
        interval: float = 2.0,
    ) -> None:
        self._records = records
        self._backend = backend
        self._proxy = proxy
        self._launcher = launcher
        self._ender = ender
        self._metrics = metrics
        self.interval = interval
        self._healthy: dict[str, str] = dict.fromkeys(("database", "proxy", "backend"), "unknown")
        self._checked: dict[str, float] = {}
        self._proxy_fresh = True
        """True until the routes of deployed apps are known to be in the proxy."""
        self._rounds = 0

    def health(self) -> dict[str, str]:
        """Each dependency's last word; ``stale`` when no look has finished for too long."""
        stale_after = 2 * self.interval + 2 * CHECK_DEADLINE_SECONDS
        at = time.monotonic()
        return {
            name: state
            if name not in self._checked or at - self._checked[name] <= stale_after
            else "stale: no answer in time"
            for name, state in self._healthy.items()
        }

    def mark(self, name: str, state: str) -> None:
        """Record a look at ``name`` made elsewhere (a launch that found it up again)."""
        self._healthy[name] = state
        self._checked[name] = time.monotonic()

    async def run(self) -> None:
        while True:
            await self.check_once()
            await anyio.sleep(self.interval)

    async def check_once(self) -> None:
        await self._probe("database", self._records.ping)
        await self._probe("proxy", self._look_at_proxy)
        await self._probe("backend", self._backend.ping)
        if self._healthy["database"] != "ok":
            return
        restore = self._healthy["proxy"] == "ok" and self._proxy_fresh
        self._rounds += 1
        try:
            with anyio.fail_after(10 * CHECK_DEADLINE_SECONDS):
                await self._ender.flush()
                if restore or self._rounds >= SWEEP_EVERY_ROUNDS:
                    self._rounds = 0
                    await self._sweep(restore=restore)
        except (BinderError, TimeoutError) as exc:
            logger.warning("keeper check incomplete: {}", getattr(exc, "message", "timed out"))

    async def _sweep(self, *, restore: bool) -> None:
        """Read the active deployments: gauges, routes put back, hung launches failed."""
        active = await self._records.find(statuses=ACTIVE, pooled=None)
        self._set_gauges(active)
        if restore:
            await self._restore_routes(active)
            self._proxy_fresh = False
        await self._fail_hung(active)

    async def _probe(self, name: str, call: Callable[[], Awaitable[None]]) -> None:
        try:
            with anyio.fail_after(CHECK_DEADLINE_SECONDS):
                await call()
        except BinderError as exc:
            self.mark(name, exc.message)
        except TimeoutError:
            self.mark(name, f"no answer within {CHECK_DEADLINE_SECONDS:g} s")
        else:
            self.mark(name, "ok")

    async def _look_at_proxy(self) -> None:
        """One cheap request: is the sentinel route still there (the proxy did not restart)?"""
        if await self._proxy.route(SENTINEL_ROUTE) is None:
            await self._proxy.add_route(SENTINEL_ROUTE, SENTINEL_TARGET)
            self._proxy_fresh = True

    def _set_gauges(self, active: list[Deployment]) -> None:
        counts = {s.value: 0 for s in Status}
        for dep in active:
            counts[dep.status.value] += 0 if dep.pooled else 1
        for status, count in counts.items():
            self._metrics.deployments.labels(status=status).set(count)

    async def _restore_routes(self, active: list[Deployment]) -> None:
        routes = await self._proxy.routes()
        for dep in active:
            if (
                dep.status is Status.DEPLOYED
                and dep.target
                and not self._ender.ending(dep.id)
                and routes.get(dep.route, ("",))[0] != dep.target
            ):
                logger.bind(id=dep.id).info("route missing in the proxy; adding it again")
                await self._proxy.add_route(dep.route, dep.target)

    async def _fail_hung(self, active: list[Deployment]) -> None:
        limit = timedelta(seconds=self._launcher.timeout + 10)
        for dep in active:
            if (
                dep.status is Status.DEPLOYING
                and not self._launcher.running(dep.id)
                and now() - dep.created > limit
            ):
                await self._ender.fail(
                    dep, f"timed out after {self._launcher.timeout:g} s (launch was interrupted)"
                )
