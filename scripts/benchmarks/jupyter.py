"""``scripts/bench launch --template jupyter`` on the local backend: JupyterLab's own start beside
its launches through the suite.

JupyterLab alone is the template's own command (``configs/templates/jupyter.toml``), started as
an unsandboxed local app starts (through ``binder-sandbox``'s direct form, as the apps' user,
a fresh 0700 ``HOME``, its token in the environment) but with no suite and no sandbox, and
polled from the spawn: its first answer at its base URL (what a user's browser would get), and its first 200
at its ``ready-path`` (``api``: when the suite calls it ready). Launches (POST to ``deployed``,
followed on the events stream) run one at a time, in pairs with a run of JupyterLab alone (every
other pair the other way round), each begun once the machine is quiet, so both see the same
machine; then pooled launches (the POST alone: it answers ``deployed``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
from harness import free_port

from common.local_http import RequestError, request
from common.settings import LocalSettings
from scripts.benchmarks import launch
from scripts.benchmarks.shared import ROOT, Suite, pct, running_suite
from services.deploy_kubernetes.backends.base import LaunchSpec
from services.deploy_kubernetes.backends.local.helper import (
    closed_to_others,
    direct_words,
    installation,
)
from services.deploy_kubernetes.backends.local.users import app_user
from services.deploy_kubernetes.models import new_id, parse_template

TEMPLATE = ROOT / "configs" / "templates" / "jupyter.toml"
POOL = 2


async def _status(url: str) -> int | None:
    try:
        return (await request(url, seconds=2.0)).status
    except RequestError:
        return None


async def alone() -> tuple[float, float]:
    """JupyterLab started as the local backend starts it, with no suite: seconds from the spawn
    to its first 2xx/3xx at its base URL, and to its first 200 at its ready path."""
    await launch.quiet_machine()
    template = parse_template(tomllib.loads(TEMPLATE.read_text()))
    port, token = free_port(), secrets.token_urlsafe(24)
    spec = LaunchSpec(id=new_id(), template=template, token=token)
    user = app_user(LocalSettings())
    home = Path(tempfile.mkdtemp(prefix="jupyter-alone-"))
    if user is not None:
        os.chown(home, user.uid, user.gid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), **spec.environment(port=port, python="")}
    argv = [  # as the apps' user; its memory is not limited (a cgroup limits it in the suite)
        *direct_words(None, user, closed_to_others(installation()) if user else None),
        *(spec.substitute(w, port=port, python="") for w in template.command),
    ]
    base = f"http://127.0.0.1:{port}{spec.base_url}"
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd="/",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    first = 0.0
    try:
        while True:
            if not first:
                status = await _status(base)
                if status is not None and 200 <= status < 400:
                    first = time.perf_counter() - start
            if first and await _status(base + template.ready_path) == 200:
                return first, time.perf_counter() - start
            if proc.returncode is not None or time.perf_counter() - start > 60:
                raise SystemExit("JupyterLab alone did not start (is `make setup` done as root?)")
            await asyncio.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()
        shutil.rmtree(home, ignore_errors=True)


async def measure(suite: Suite, runs: int) -> dict[str, float | int | str]:
    limits = httpx.Limits(keepalive_expiry=1)
    async with httpx.AsyncClient(base_url=suite.url, timeout=120, limits=limits) as client:
        warm = await launch.launch(client, "jupyter")  # the first start reads a cold disk
        await launch.delete_all(client, suite, "jupyter", [warm.id])
        base, ready, launched = [], [], []
        for i in range(runs):
            if i % 2:  # every other pair the other way round: neither goes first always
                launched.append(await _launch_once(client, suite))
            first, api = await alone()
            base.append(first)
            ready.append(api)
            if not i % 2:
                launched.append(await _launch_once(client, suite))
        pooled = await _pooled(client, suite, runs)
    ms = 1000.0
    return {
        "runs": runs,
        "jupyter_alone_base_url_p50_ms": statistics.median(base) * ms,
        "jupyter_alone_ready_path_p50_ms": statistics.median(ready) * ms,
        "unpooled_p50_ms": statistics.median(launched) * ms,
        "unpooled_p95_ms": pct(launched, 0.95) * ms,
        "overhead_vs_ready_path_paired_p50_ms": statistics.median(
            [x - a for x, a in zip(launched, ready, strict=True)]
        )
        * ms,
        "overhead_vs_base_url_paired_p50_ms": statistics.median(
            [x - a for x, a in zip(launched, base, strict=True)]
        )
        * ms,
        "pooled_p50_ms": statistics.median(pooled) * ms,
        "pooled_p95_ms": pct(pooled, 0.95) * ms,
    }


async def _launch_once(client: httpx.AsyncClient, suite: Suite) -> float:
    await launch.quiet_machine()
    outcome = await launch.launch(client, "jupyter")
    await launch.delete_all(client, suite, "jupyter", [outcome.id])
    if outcome.status != "deployed":
        raise SystemExit(f"a jupyter launch ended {outcome.status}")
    return outcome.seconds


async def _pooled(client: httpx.AsyncClient, suite: Suite, runs: int) -> list[float]:
    put = await client.put("/pools/jupyter", json={"size": POOL}, headers=suite.auth)
    put.raise_for_status()
    out = []
    try:
        for _ in range(runs):
            deadline = time.monotonic() + 120
            while (await client.get("/pools/jupyter", headers=suite.auth)).json()["ready"] < POOL:
                if time.monotonic() > deadline:
                    raise SystemExit("the jupyter pool did not fill within 120 s")
                await asyncio.sleep(0.05)
            await launch.quiet_machine()  # the refills' JupyterLabs have settled
            outcome = await launch.launch(client, "jupyter")
            if outcome.status != "deployed":
                raise SystemExit(f"a pooled jupyter launch ended {outcome.status}")
            out.append(outcome.seconds)
            await launch.delete_all(client, suite, "jupyter", [outcome.id])
    finally:
        await client.put("/pools/jupyter", json={"size": 0}, headers=suite.auth)
    return out


def run(runs: int) -> tuple[dict[str, float | int | str], dict[str, str]]:
    print(
        f"launch of the jupyter template on the local backend: JupyterLab alone (spawn to its "
        f"first answer at its base URL, and at its ready path) and launches (POST to deployed), "
        f"interleaved, x{runs}; pooled launches x{runs}"
    )
    with running_suite() as suite:
        figures = asyncio.run(measure(suite, runs))
    targets = {
        "overhead_vs_ready_path_paired_p50_ms": "(target <= 50)",
        "pooled_p50_ms": "(target < 10)",
    }
    return figures, targets
