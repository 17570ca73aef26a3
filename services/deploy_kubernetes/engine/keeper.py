"""The keeper, in every server: every few seconds it looks at the database, the proxy and the
backend (each look bounded by a deadline, so a frozen dependency shows as down instead of
hanging), writes the final statuses that wait in the ender's outbox, and sets the gauges.

Those three looks are cheap and made every round. The counts (the gauges, each client's
deployments) are read every few rounds only: they are scraped far less often than that.
What must run once (culling, pools, adopting launches) is the leader's, and keeping this host's
proxy's routes is the host's route keeper's (:mod:`.routes`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
from loguru import logger

from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend
from services.deploy_kubernetes.engine.ending import Ender
from services.deploy_kubernetes.engine.limits import ClientLimits
from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Status
from services.deploy_kubernetes.store.base import ACTIVE

CHECK_DEADLINE_SECONDS = 1.5
SWEEP_EVERY_ROUNDS = 5
"""Rounds between two reads of the counts and the active deployments (gauges)."""


class Keeper:
    def __init__(
        self,
        *,
        records: Records,
        backend: Backend,
        proxy: Proxy,
        ender: Ender,
        client_limits: ClientLimits,
        metrics: Metrics,
        interval: float = 2.0,
    ) -> None:
        self._records = records
        self._backend = backend
        self._proxy = proxy
        self._ender = ender
        self._client_limits = client_limits
        self._metrics = metrics
        self.interval = interval
        self._healthy: dict[str, str] = dict.fromkeys(("database", "proxy", "backend"), "unknown")
        self._checked: dict[str, float] = {}
        self._rounds = SWEEP_EVERY_ROUNDS

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
        await self._probe("proxy", self._proxy.ping)
        await self._probe("backend", self._backend.ping)
        if self._healthy["database"] != "ok":
            return
        self._rounds += 1
        try:
            with anyio.fail_after(10 * CHECK_DEADLINE_SECONDS):
                await self._ender.flush()
                if self._rounds >= SWEEP_EVERY_ROUNDS:
                    self._rounds = 0
                    await self._sweep()
        except (BinderError, TimeoutError) as exc:
            logger.warning("keeper check incomplete: {}", getattr(exc, "message", "timed out"))

    async def _sweep(self) -> None:
        """Read the counts and the active deployments: gauges, each client's deployments."""
        counts = await self._records.counts()
        self._client_limits.note_held(counts.clients)
        active = await self._records.find(statuses=ACTIVE, pooled=None)
        totals = {s.value: 0 for s in Status}
        for dep in active:
            totals[dep.status.value] += 0 if dep.pooled else 1
        for status, count in totals.items():
            self._metrics.deployments.labels(status=status).set(count)

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
