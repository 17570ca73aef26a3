"""The leader's reconcile removes the apps and routes no record accounts for, but never those
of a launch this server runs, whose record may still be on its way to the database."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from fakes import FakeBackend, FakeProxy

from common.proxy import ProxyRoute
from services.deploy_kubernetes.backends.base import Observed, State
from services.deploy_kubernetes.engine import reconcile
from services.deploy_kubernetes.engine.reconcile import Reconciler
from services.deploy_kubernetes.models import Deployment

IN_FLIGHT = "a" * 32
ORPHAN = "b" * 32


class _NoRecords:
    """No record at all: the in-flight launch's is not written yet, the orphan has none."""

    async def find(self, **_: Any) -> list[Deployment]:
        return []

    async def get(self, dep_id: str) -> Deployment | None:
        return None


class _Leases:
    async def alive(self, *, within: float) -> set[str]:
        return set()


class _Launcher:
    def __init__(self, running: set[str]) -> None:
        self._running = running

    def running(self, dep_id: str) -> bool:
        return dep_id in self._running


def test_the_app_and_route_of_a_launch_under_way_here_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile, "ORPHAN_GRACE_SECONDS", 0.0)
    backend, proxy = FakeBackend(), FakeProxy()
    for dep_id in (IN_FLIGHT, ORPHAN):
        target = f"http://fake/{dep_id}"
        backend.running[dep_id] = Observed(id=dep_id, state=State.RUNNING, target=target)
        proxy.table[f"/user/{dep_id}"] = ProxyRoute(target=target)
    reconciler: Any = Reconciler(
        records=_NoRecords(),  # type: ignore[arg-type]
        catalog=None,  # type: ignore[arg-type]
        backend=backend,
        proxy=proxy,
        launcher=_Launcher({IN_FLIGHT}),  # type: ignore[arg-type]
        ender=None,  # type: ignore[arg-type]
        leases=_Leases(),  # type: ignore[arg-type]
        server="here",
        beat_seconds=3.0,
    )
    counts = anyio.run(reconciler.run)
    assert ("stop", ORPHAN) in backend.calls
    assert ("stop", IN_FLIGHT) not in backend.calls
    assert set(backend.running) == {IN_FLIGHT}
    assert set(proxy.table) == {f"/user/{IN_FLIGHT}"}
    assert counts["orphans"] == 1
    assert counts["stale_routes"] == 1
