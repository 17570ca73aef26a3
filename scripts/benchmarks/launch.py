"""``scripts/bench launch`` on the local backend: every figure and ratio of a launch, in one run.

The suite runs as operators run it (``binder-control start-all``: supervisord, the database, the
log aggregator, the proxy, the deploy server) in a scratch home. Measured, in this order:
the app's own spawn-to-first-answer (``services/example_app.py`` started and polled directly),
launches one at a time (POST to ``deployed``, waited for on the events stream), pooled launches
(the POST alone: its answer is ``deployed`` already), bursts of 10 and 50, the same for a slow app
(one that listens only after 2 s), the example app again with each launch's window held open as
long as a slow one's (the fair yardstick for the slow app's CPU: the same seconds of the control
plane's timers, the same cold caches after a pause), and the CPU the control plane (database,
aggregator, proxy, deploy server; apps excluded) spends per launch, read from ``/proc/<pid>/stat``
around each phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import httpx
from harness import EXAMPLE_COMMAND, free_port

from common.local_http import RequestError
from scripts.benchmarks.shared import (
    ROOT,
    Suite,
    machine_busy_ms,
    post_and_follow,
    running_suite,
)

SLOW_SECONDS = 2.0
SLOW_RUNS = 6
"""Slow launches one at a time: the first has no start history of its template to go by."""
IDLE_SETTLE_SECONDS = 10.0
QUIET_SHARE = 0.1
"""A burst starts once the machine's cores have been at most this busy over 0.1 s (within
:data:`QUIET_WAIT_SECONDS`): the apps of the burst before have stopped, as the machine is quiet
for the app alone that the burst is measured against."""
QUIET_WAIT_SECONDS = 10.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def listening(port: int) -> bool:
    """A TCP connect attempt: tens of microseconds, so polling every millisecond takes no CPU
    worth speaking of from the app that is starting on the same cores."""
    with socket.socket() as sock:
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            return False
    return True


async def app_alone(client: httpx.AsyncClient) -> float:
    """Spawn the example app directly; seconds until its first 200 (connect attempts every
    millisecond until it listens, then GETs)."""
    port = free_port()
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.example_app", "--port", str(port)),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        while True:
            if await listening(port):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200:
                        return time.perf_counter() - start
            if proc.returncode is not None or time.perf_counter() - start > 30:
                raise SystemExit("the example app did not start")
            await asyncio.sleep(0.001)
    finally:
        proc.terminate()
        await proc.wait()


@dataclass
class Outcome:
    seconds: float
    status: str
    id: str = ""


CLIENT = "light"
"""How launches are made: ``light``, one request each on a connection of its own read by
httptools (:mod:`common.local_http`), about a fifth of httpx's CPU; or ``httpx``. The client
shares the two cores with the suite in a burst, where real clients (browsers) would not."""


async def launch(client: httpx.AsyncClient, template: str) -> Outcome:
    """POST a launch; when it answers ``deploying``, follow its events until it leaves that (a
    pooled launch answers ``deployed`` at once: one request, as a real client does)."""
    if CLIENT == "light":
        return await _launch_light(str(client.base_url).rstrip("/"), template)
    start = time.perf_counter()
    response = await client.post(f"/applications/{template}")
    if response.status_code != 200:
        return Outcome(time.perf_counter() - start, f"POST answered {response.status_code}")
    answer = response.json()
    dep_id, status = answer["id"], answer["status"]
    if status != "deploying":
        return Outcome(time.perf_counter() - start, status, dep_id)
    async with client.stream("GET", f"/applications/{template}/{dep_id}/events") as events:
        async for line in events.aiter_lines():
            if line.startswith("data: "):
                status = json.loads(line[6:])["status"]
                if status != "deploying":
                    break
    return Outcome(time.perf_counter() - start, status, dep_id)


async def _launch_light(url: str, template: str) -> Outcome:
    start = time.perf_counter()
    try:
        code, dep_id, status = await post_and_follow(url, template)
    except RequestError as exc:
        return Outcome(time.perf_counter() - start, f"request failed: {exc}")
    if code != 200:
        return Outcome(time.perf_counter() - start, f"POST answered {code}")
    return Outcome(time.perf_counter() - start, status, dep_id)


async def delete_all(
    client: httpx.AsyncClient, suite: Suite, template: str, ids: list[str]
) -> None:
    await asyncio.gather(
        *(client.delete(f"/applications/{template}/{i}", headers=suite.auth) for i in ids if i)
    )


@dataclass
class Phase:
    """Launches of one phase and what the control plane spent on them."""

    outcomes: list[Outcome]
    wall: float
    cpu: dict[str, float]

    @property
    def ok(self) -> list[float]:
        return [o.seconds for o in self.outcomes if o.status == "deployed"]

    @property
    def failures(self) -> int:
        return sum(o.status != "deployed" for o in self.outcomes)

    def cpu_per_launch(self) -> float:
        return sum(self.cpu.values()) / max(1, len(self.outcomes))


async def quiet_machine() -> None:
    """Return once the machine has been quiet for 0.1 s (see :data:`QUIET_SHARE`), or after
    :data:`QUIET_WAIT_SECONDS` whatever it does."""
    cores = len(os.sched_getaffinity(0))
    deadline = time.monotonic() + QUIET_WAIT_SECONDS
    while time.monotonic() < deadline:
        before = machine_busy_ms()
        await asyncio.sleep(0.1)
        if machine_busy_ms() - before <= QUIET_SHARE * 100 * cores:
            return


async def burst(client: httpx.AsyncClient, suite: Suite, template: str, runs: int) -> Phase:
    """``runs`` launches at once on a quiet machine, kept until all are deployed and the CPU is
    read, then deleted."""
    await quiet_machine()
    before = suite.cpu()
    start = time.perf_counter()
    outcomes = list(await asyncio.gather(*(launch(client, template) for _ in range(runs))))
    wall = time.perf_counter() - start
    after = suite.cpu()
    await delete_all(client, suite, template, [o.id for o in outcomes])
    return Phase(outcomes, wall, {n: after[n] - before[n] for n in before})


async def one_at_a_time(
    client: httpx.AsyncClient,
    suite: Suite,
    template: str,
    runs: int,
    alone: list[float] | None,
    hold: float = 0.0,
) -> Phase:
    """``runs`` launches one after another, each after a run of the app alone when ``alone`` is
    given (so both see the same machine); CPU and wall time are summed over the launches only,
    each with the ``hold`` seconds that follow it once it is deployed."""
    outcomes, wall = [], 0.0
    cpu = dict.fromkeys(suite.pids, 0.0)
    async with httpx.AsyncClient(timeout=5) as direct:
        for _ in range(runs):
            if alone is not None:
                alone.append(await app_alone(direct))
            before, start = suite.cpu(), time.perf_counter()
            outcomes.append(await launch(client, template))
            await asyncio.sleep(hold)
            wall += time.perf_counter() - start
            after = suite.cpu()
            for name in cpu:
                cpu[name] += after[name] - before[name]
    await delete_all(client, suite, template, [o.id for o in outcomes])
    return Phase(outcomes, wall, cpu)


async def pooled(client: httpx.AsyncClient, suite: Suite, runs: int) -> list[Outcome]:
    (await client.put("/pools/example", json={"size": 3}, headers=suite.auth)).raise_for_status()
    out = []
    for _ in range(runs):
        deadline = time.monotonic() + 30
        while (await client.get("/pools/example", headers=suite.auth)).json()["ready"] < 3:
            if time.monotonic() > deadline:
                raise SystemExit("the pool did not fill within 30 s")
            await asyncio.sleep(0.01)
        outcome = await launch(client, "example")
        out.append(outcome)
        await delete_all(client, suite, "example", [outcome.id])
    (await client.put("/pools/example", json={"size": 0}, headers=suite.auth)).raise_for_status()
    return out


async def idle_cpu_ms_per_s(suite: Suite, seconds: float = 10.0) -> float:
    """CPU the control plane spends per second with nothing happening (its periodic work)."""
    before = suite.cpu()
    await asyncio.sleep(seconds)
    return (sum(suite.cpu().values()) - sum(before.values())) / seconds


def slow_template() -> dict[str, object]:
    return {
        "image-source": "binder-example:latest",
        "port": 8888,
        "command": [*EXAMPLE_COMMAND, "--delay", str(SLOW_SECONDS)],
        "max-deployments": 100,
    }


@dataclass
class Results:
    idle_ms_per_s: float
    alone: list[float]
    seq: Phase
    pooled: list[Outcome]
    b10: list[Phase]
    b50: Phase
    slow_seq: Phase
    slow_b10: Phase
    held: Phase
    """The example app one at a time, each launch's window held open as long as a slow one's:
    what the control plane spends in that time whatever the app does."""


def by_process(p: Phase) -> str:
    n = max(1, len(p.outcomes))
    return " ".join(f"{name.split('-')[0]}={ms / n:.1f}" for name, ms in p.cpu.items())


async def measure(suite: Suite, runs: int, bursts: int) -> Results:
    # idle connections are dropped well before the server's keep-alive timeout (5 s), so that no
    # request goes out on a connection the server is closing
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=1)
    async with httpx.AsyncClient(base_url=suite.url, timeout=120, limits=limits) as client:
        put = await client.put("/templates/slow", json=slow_template(), headers=suite.auth)
        put.raise_for_status()
        await one_at_a_time(client, suite, "example", 2, [])  # warm-up
        # the proxy spends 7-8 ms/s for some seconds after launches end: not its idle rate
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        idle = await idle_cpu_ms_per_s(suite)
        alone: list[float] = []
        seq = await one_at_a_time(client, suite, "example", runs, alone)
        pool = await pooled(client, suite, runs)
        b10 = [await burst(client, suite, "example", 10) for _ in range(bursts)]
        b50 = await burst(client, suite, "example", 50)
        slow_seq = await one_at_a_time(client, suite, "slow", SLOW_RUNS, None)
        held = await one_at_a_time(client, suite, "example", SLOW_RUNS, None, SLOW_SECONDS)
        slow_b10 = await burst(client, suite, "slow", 10)
        return Results(idle, alone, seq, pool, b10, b50, slow_seq, slow_b10, held)


def less_idle(p: Phase, idle_ms_per_s: float) -> float:
    """CPU per launch of ``p`` beyond what the control plane spends meanwhile with nothing to
    do (its timers): what the launches themselves cost."""
    return p.cpu_per_launch() - idle_ms_per_s * p.wall / max(1, len(p.outcomes))


def _p50(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else 0.0


def _failure_reasons(r: Results) -> str:
    """Each phase's launches that did not end ``deployed``: how they ended, and how many."""
    named = {"one at a time": r.seq.outcomes, "pooled": r.pooled, "burst of 50": r.b50.outcomes}
    named |= {"bursts of 10": [o for p in r.b10 for o in p.outcomes]}
    named |= {"slow": r.slow_seq.outcomes + r.slow_b10.outcomes, "held": r.held.outcomes}
    counts = Counter(
        (phase, o.status) for phase, outs in named.items() for o in outs if o.status != "deployed"
    )
    return "; ".join(f"{phase}: {n} x {status}" for (phase, status), n in counts.items()) or "-"


def figures(r: Results) -> tuple[dict[str, float | int | str], dict[str, str]]:
    cores = len(os.sched_getaffinity(0))
    app_p50 = statistics.median(r.alone)
    pooled_ok = [o.seconds for o in r.pooled if o.status == "deployed"]
    b10_wall = statistics.median(p.wall for p in r.b10)
    b10_ok = [s for p in r.b10 for s in p.ok]
    seq = r.seq
    phases = [seq, *r.b10, r.b50, r.slow_seq, r.slow_b10, r.held]
    f: dict[str, float | int | str] = {
        "cores": cores,
        "app_alone_p50_ms": app_p50 * 1000,
        "app_alone_p95_ms": pct(r.alone, 0.95) * 1000,
        "unpooled_p50_ms": _p50(seq.ok),
        "unpooled_p95_ms": pct(seq.ok, 0.95) * 1000,
        "overhead_p50_ms": _p50(seq.ok) - app_p50 * 1000,
        "overhead_paired_p50_ms": _p50(
            [o.seconds - a for o, a in zip(seq.outcomes, r.alone, strict=True)]
        ),
        "pooled_p50_ms": _p50(pooled_ok),
        "pooled_p95_ms": pct(pooled_ok, 0.95) * 1000,
        "burst10_all_deployed_s": b10_wall,
        "burst10_machine_limit_s": 10 * app_p50 / cores,
        "burst10_excess_s": b10_wall - 10 * app_p50 / cores,
        "burst10_excess_worst_s": max(p.wall for p in r.b10) - 10 * app_p50 / cores,
        "burst10_excess_each_s": " ".join(f"{p.wall - 10 * app_p50 / cores:.3f}" for p in r.b10),
        "burst10_launch_p50_ms": _p50(b10_ok),
        "burst10_launch_p95_ms": pct(b10_ok, 0.95) * 1000,
        "burst50_all_deployed_s": r.b50.wall,
        "burst50_machine_limit_s": 50 * app_p50 / cores,
        "burst50_excess_s": r.b50.wall - 50 * app_p50 / cores,
        "burst50_launch_p50_ms": _p50(r.b50.ok),
        "burst50_launch_p95_ms": pct(r.b50.ok, 0.95) * 1000,
        "failures": sum(p.failures for p in phases) + len(r.pooled) - len(pooled_ok),
        "failure_reasons": _failure_reasons(r),
        "idle_cpu_ms_per_s": r.idle_ms_per_s,
        "cpu_ms_per_launch_seq": seq.cpu_per_launch(),
        "cpu_ms_per_launch_seq_less_idle": less_idle(seq, r.idle_ms_per_s),
        "cpu_ms_per_launch_burst10": statistics.median(p.cpu_per_launch() for p in r.b10),
        "cpu_ms_per_launch_burst50": r.b50.cpu_per_launch(),
        "slow_p50_ms": _p50(r.slow_seq.ok),
        "slow_overhead_p50_ms": _p50(r.slow_seq.ok) - SLOW_SECONDS * 1000,
        "slow_burst10_all_deployed_s": r.slow_b10.wall,
        "cpu_ms_per_launch_slow_seq": r.slow_seq.cpu_per_launch(),
        "cpu_ms_per_launch_slow_seq_less_idle": less_idle(r.slow_seq, r.idle_ms_per_s),
        "slow_over_example_cpu_less_idle": less_idle(r.slow_seq, r.idle_ms_per_s)
        / max(0.1, less_idle(seq, r.idle_ms_per_s)),
        "cpu_ms_per_launch_example_held": r.held.cpu_per_launch(),
        "slow_over_example_held_cpu": r.slow_seq.cpu_per_launch()
        / max(0.1, r.held.cpu_per_launch()),
        "cpu_ms_per_launch_slow_burst10": r.slow_b10.cpu_per_launch(),
        "cpu_by_process_seq": by_process(seq),
        "cpu_by_process_burst50": by_process(r.b50),
        "cpu_by_process_slow_seq": by_process(r.slow_seq),
        "cpu_by_process_example_held": by_process(r.held),
    }
    targets = {
        "overhead_p50_ms": "(target <= 20)",
        "pooled_p50_ms": "(target < 5)",
        "burst10_excess_s": "(target <= 0.1)",
        "burst10_excess_worst_s": "(every burst: target <= 0.1)",
        "burst50_excess_s": "(scales linearly: target <= 0.5)",
        "failures": "(target 0)",
        "cpu_ms_per_launch_seq": "(target < 25)",
        "slow_over_example_held_cpu": "(not growing with start time: target ~1)",
    }
    return f, targets


def run(
    runs: int, bursts: int, client: str = "light", *, sandbox: bool = True, servers: int = 1
) -> tuple[dict[str, float | int | str], dict[str, str]]:
    global CLIENT
    CLIENT = client
    print(
        f"launch on the local backend: the app alone and one launch at a time, x{runs} each, "
        f"interleaved; pooled x{runs}; bursts of 10 x{bursts} and of 50; a slow app "
        f"({SLOW_SECONDS:g} s) x{SLOW_RUNS} and in a burst of 10, the example app held as long "
        f"x{SLOW_RUNS}; the {client} client; the sandbox {'on' if sandbox else 'off'}; "
        f"{servers} deploy server(s)"
    )
    with running_suite(sandbox=sandbox, servers=servers) as suite:
        results = asyncio.run(measure(suite, runs, bursts))
    return figures(results)
