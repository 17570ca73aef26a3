"""``scripts/bench status``: status requests per second at 32 connections against ``/health``,
with one deploy server and with several on the shared port; and where the machine's CPU went
during each (the deploy servers, the rest of the control plane, wrk, and the kernel's and other
processes' share), per request: two servers can scale only as far as the cores the load
generator and the kernel leave them."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pymongo import MongoClient

from scripts.benchmarks.shared import Suite, machine_busy_ms, report, running_suite

WRK_SCRIPT = """
local ids = {}
for line in io.lines("%s") do ids[#ids + 1] = line end
local i = 0
request = function()
  i = i %% #ids + 1
  return wrk.format("GET", "/applications/example/" .. ids[i])
end
"""


def _wrk(url: str, seconds: int, script: Path | None = None) -> float:
    argv = ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise SystemExit(f"wrk printed no rate:\n{out}")


def _children_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def _measured(suite: Suite, url: str, seconds: int, script: Path | None = None) -> dict[str, float]:
    """wrk's rate against ``url``, and the CPU per request of each side (microseconds)."""
    procs = suite.cpu()
    machine, wrk, began = machine_busy_ms(), _children_ms(), time.monotonic()
    rate = _wrk(url, seconds, script)
    took = time.monotonic() - began
    requests = rate * seconds
    after = suite.cpu()
    servers = sum(after[k] - procs[k] for k in procs if k.startswith("deploy-kubernetes"))
    control = sum(after[k] - procs[k] for k in procs) - servers
    wrk_ms, busy = _children_ms() - wrk, machine_busy_ms() - machine
    per = 1000 / requests  # ms over all requests -> us per request
    return {
        "rps": rate,
        "servers_us": servers * per,
        "control_plane_rest_us": control * per,
        "wrk_us": wrk_ms * per,
        "kernel_and_other_us": (busy - servers - control - wrk_ms) * per,
        "cores_busy": busy / 1000 / took,
    }


WARM_UP_SECONDS = 2
"""Unmeasured load on each endpoint first. The records were stored behind the server's back, so
before it every record is read once: the first read of each goes to the database, and a client
polling a deployment reads one the server already holds."""


def _status_rps(seconds: int, servers: int) -> tuple[dict[str, float], dict[str, float]]:
    """(status reads, /health) of a suite with ``servers`` deploy servers: :func:`_measured`."""
    with running_suite(servers=servers) as suite:
        ids = [f"{n:032x}" for n in range(1, 1001)]
        now = datetime.now(UTC)
        with MongoClient[dict[str, Any]](suite.secrets()["BINDER_DB_URI"]) as mongo:
            mongo["binder"]["deployments"].insert_many(
                [
                    {
                        "id": i,
                        "template": "example",
                        "status": "deleted",
                        "created": now,
                        "cull_timeout_ms": 3600000,
                        "location": f"h/user/{i}",
                        "url": f"http://h/user/{i}/",
                        "reason": "deleted by request",
                        "pooled": False,
                        "backend_ref": {},
                    }
                    for i in ids
                ]
            )
        id_file = suite.home / "ids.txt"
        id_file.write_text("\n".join(ids) + "\n")
        script = suite.home / "status.lua"
        script.write_text(WRK_SCRIPT % id_file)
        with httpx.Client(base_url=suite.url, timeout=30) as client:
            for _ in range(servers):  # each server reads each record once
                for i in ids:
                    client.get(f"/applications/example/{i}").raise_for_status()
        for url, lua in ((suite.url + "/health", None), (suite.url, script)):
            _wrk(url, WARM_UP_SECONDS, lua)
        health = _measured(suite, suite.url + "/health", seconds)
        status = _measured(suite, suite.url, seconds, script)
    return status, health


def _scaling_bound(fewer: dict[str, float], more: int) -> float:
    """The most ``more`` servers can scale status reads over the ones measured in ``fewer``,
    should each request cost all it did there (the servers', the rest of the control plane's,
    wrk's and the kernel's CPU) and ``more`` servers keep every core busy: wrk shares the cores
    with the servers, so two servers on two cores cannot double one's rate."""
    cores = min(more, len(os.sched_getaffinity(0)))
    per_request = sum(max(0.0, v) for k, v in fewer.items() if k.endswith("_us"))
    return cores * 1e6 / per_request / fewer["rps"]


def bench_status(seconds: int, servers: list[int]) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    print(
        f"status throughput at 32 connections over {seconds} s, 1,000 records stored, with "
        f"{' and '.join(map(str, servers))} deploy server(s) (binder-control start-all); each "
        f"measured after every record was read and a {WARM_UP_SECONDS} s warm-up"
    )
    figures: dict[str, float | int | str] = {}
    measured: dict[int, dict[str, float]] = {}
    for n in servers:
        status, health = _status_rps(seconds, n)
        measured[n] = status
        figures[f"status_rps_{n}"] = status["rps"]
        figures[f"health_rps_{n}"] = health["rps"]
        figures[f"ratio_{n}"] = status["rps"] / health["rps"]
        for what, seen in (("status", status), ("health", health)):
            figures[f"{what}_cpu_us_per_request_{n}"] = " ".join(
                f"{k.removesuffix('_us')}={v:.0f}" for k, v in seen.items() if k.endswith("_us")
            )
            figures[f"{what}_cores_busy_{n}"] = seen["cores_busy"]
    if len(servers) > 1:
        low, high = min(servers), max(servers)
        figures["status_scaling"] = figures[f"status_rps_{high}"] / figures[f"status_rps_{low}"]  # type: ignore[operator]
        figures["health_scaling"] = figures[f"health_rps_{high}"] / figures[f"health_rps_{low}"]  # type: ignore[operator]
        figures["status_scaling_bound"] = _scaling_bound(measured[low], high)
    targets = {f"ratio_{n}": "(target >= 0.90)" for n in servers}
    targets["status_scaling"] = "(2 servers: target >= 1.7)"
    targets["status_scaling_bound"] = "(the most the cores allow at the fewer servers' costs)"
    report("status", figures, targets)
