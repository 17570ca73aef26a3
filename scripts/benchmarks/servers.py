"""``scripts/bench servers``: what several deploy servers cost and how fast they recover.

- the shared counters' cost per launch and per end: the store's admission (the counts moved and
  the record inserted in one transaction) and its move to a final status (the counts moved
  back, the record numbered in the history), one at a time, against a plain journaled insert
  and update of the same record, on the same database;
- leader failover: with ``servers = 2`` under supervisord, the seconds from a kill -9 (and from
  a SIGSTOP) of the leader until the other server holds the lease;
- the list of a template's deployments and the console with ``--records`` ended records.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from harness import Database, DeployServer, Proxy, seed_history
from pymongo import AsyncMongoClient, WriteConcern

from control.supervisor_client import Supervisor
from scripts.benchmarks.shared import Suite, report, running_suite
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.store.base import Admission, Change
from services.deploy_kubernetes.store.mongo import MongoStore

RUNS = 200


def _dep() -> Deployment:
    return Deployment(
        id=new_id(),
        template="example",
        status=Status.DEPLOYING,
        created=now(),
        cull_timeout_ms=3_600_000,
        client="192.0.2.1",
    )


async def _counters_cost(uri: str) -> dict[str, float]:
    """ms per operation, one at a time, alternating the two ways so both see the same machine."""
    store = MongoStore(uri=uri, database="counters_bench")
    plain_client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, journal=True)
    plain = plain_client["counters_bench"].get_collection(
        "plain", write_concern=WriteConcern(j=True)
    )
    await store.open()
    times: dict[str, list[float]] = {"admit": [], "insert": [], "end": [], "update": []}
    try:
        for _ in range(RUNS):
            dep = _dep()
            started = time.perf_counter()
            await store.admit(Admission(dep=dep, max_total=10**9, client_limit=10**9))
            times["admit"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await plain.insert_one(dep.to_doc())
            times["insert"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await store.move(dep.id, Status.DELETED, Change(reason="bench", ended_at=now()))
            times["end"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await plain.update_one(
                {"id": dep.id}, {"$set": {"status": "deleted", "reason": "bench"}}
            )
            times["update"].append(time.perf_counter() - started)
    finally:
        await store.close()
        await plain_client.close()
    out = {f"{k}_p50_ms": statistics.median(v) * 1000 for k, v in times.items()}
    out["counters_cost_per_launch_ms"] = out["admit_p50_ms"] - out["insert_p50_ms"]
    out["counters_cost_per_end_ms"] = out["end_p50_ms"] - out["update_p50_ms"]
    return out


def _own_socket(suite: Suite, number: int) -> httpx.Client:
    path = suite.home / "run" / f"deploy-kubernetes.{number}.sock"
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=2)


def _leader(suite: Suite) -> int | None:
    """The number of the server that holds the leader lease, if one does."""
    for number in (0, 1):
        try:
            with _own_socket(suite, number) as client:
                text = client.get("http://localhost/metrics").text
        except httpx.HTTPError:
            continue
        if 'binder_lease_held{lease="leader"} 1.0' in text:
            return number
    return None


def _takeover(suite: Suite, sig: signal.Signals) -> float:
    """Seconds from ``sig`` to the leader until the other server leads."""
    deadline = time.monotonic() + 30
    while (leader := _leader(suite)) is None:
        if time.monotonic() > deadline:
            raise SystemExit("no leader within 30 s")
        time.sleep(0.05)
    pid = _pid(suite, leader)
    os.kill(pid, sig)
    started = time.monotonic()

    # killed, any leader is another process (its own, restarted, may win the lease); stalled,
    # it still holds the lease until it passes and cannot answer: the other must lead
    def moved() -> bool:
        now = _leader(suite)
        return now is not None if sig is signal.SIGKILL else now == 1 - leader

    try:
        while not moved():
            if time.monotonic() - started > 60:
                raise SystemExit("no takeover within 60 s")
            time.sleep(0.02)
        return time.monotonic() - started
    finally:
        if sig is signal.SIGSTOP:
            os.kill(pid, signal.SIGCONT)


def _pid(suite: Suite, number: int) -> int:
    info = Supervisor(suite.home).info(f"deploy-kubernetes:{number}")
    assert info is not None
    return int(info["pid"])


def _failover(rounds: int = 3) -> dict[str, float]:
    with running_suite(servers=2) as suite:
        killed = [_takeover(suite, signal.SIGKILL) for _ in range(rounds)]
        stalled = [_takeover(suite, signal.SIGSTOP) for _ in range(rounds)]
        costs = asyncio.run(_counters_cost(suite.secrets()["BINDER_DB_URI"]))
    return {
        "failover_after_kill9_s_max": max(killed),
        "failover_after_kill9_s_p50": statistics.median(killed),
        "failover_after_sigstop_s_max": max(stalled),
        **costs,
    }


def _timed(url: str, **kwargs: Any) -> tuple[float, int]:
    best, size = 1e9, 0
    for _ in range(5):
        started = time.perf_counter()
        answer = httpx.get(url, timeout=60, **kwargs)
        answer.raise_for_status()
        best = min(best, time.perf_counter() - started)
        size = len(answer.content)
    return best * 1000, size


def _history(records: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="binder-bench-history-"))
    db = Database(work).start()
    proxy = Proxy(work).start()
    server = DeployServer(work, db, proxy, history_days=3650)
    try:
        started = time.monotonic()
        seed_history(db.uri, "binder", count=records, start=datetime.now(UTC) - timedelta(days=40))
        seeded = time.monotonic() - started
        server.start()
        started = time.monotonic()
        out: dict[str, float] = {"history_records": records, "seed_s": seeded}
        for name, path in (
            ("list_template", "/applications/example"),
            ("list_all", "/applications/"),
        ):
            ms, size = _timed(server.url + path, headers=server.auth)
            out[f"{name}_ms"], out[f"{name}_kb"] = ms, size / 1024
        cookies = httpx.post(
            f"{server.url}/console/session",
            json={"key": server.api_key},
            headers={"X-Binder-Console": "1"},
            timeout=10,
        ).cookies
        for name, path in (
            ("console_table", "/console/api/deployments"),
            ("console_overview", "/console/api/overview"),
        ):
            out[f"{name}_ms"], _ = _timed(server.url + path, cookies=cookies)
        return out
    finally:
        server.stop()
        proxy.stop()
        db.stop()


def bench_servers(records: int) -> None:
    print(
        f"several servers: the shared counters' cost ({RUNS} launches and ends one at a time), "
        f"leader failover (kill -9 and SIGSTOP, 2 servers), the list and console over "
        f"{records:,} ended records"
    )
    figures: dict[str, float | int | str] = {**_failover(), **_history(records)}
    targets = {
        "failover_after_kill9_s_max": "(lease 5 s: target < 8)",
        "list_template_ms": "(target < 200)",
        "list_template_kb": "(target < 1024)",
    }
    report("servers", figures, targets)
