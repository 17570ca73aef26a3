"""What the benchmarks share: figures (percentiles, the report line) and a suite of the real
components to measure (a database, a proxy and a deploy server in a scratch folder)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import Database, DeployServer, Proxy, free_port

from common.local_http import request
from control.supervisor_client import Supervisor

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root."""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(name: str, figures: Mapping[str, float | int | str], targets: dict[str, str]) -> None:
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:32} {shown}   {targets.get(key, '')}")
    print(json.dumps({"bench": name, **figures}))


@contextmanager
def suite(extra: str = "", **deploy: Any) -> Iterator[DeployServer]:
    work = Path(tempfile.mkdtemp(prefix="binder-bench-"))
    db = Database(work).start()
    proxy = Proxy(work).start()
    # every request of a benchmark comes from 127.0.0.1: lift the per-client limits
    lifted: dict[str, Any] = {
        "per_client_max_deployments": 1000,
        "per_client_launches_per_minute": 1000000,
        "per_client_max_connections": 1000000,
        "per_client_event_streams": 1000000,
    }
    server = DeployServer(work, db, proxy, **{**lifted, **deploy})
    server.config.write_text(server.config.read_text() + extra)
    try:
        yield server.start()
    finally:
        server.stop()
        server.remove_apps()
        proxy.stop()
        db.stop()
        shutil.rmtree(work, ignore_errors=True)


def launch_once(client: httpx.Client, server: DeployServer, template: str = "example") -> float:
    start = time.perf_counter()
    dep_id = client.post(f"/applications/{template}").json()["id"]
    while True:
        info = client.get(f"/applications/{template}/{dep_id}").json()
        if info["status"] != "deploying":
            break
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    if info["status"] != "deployed":
        raise SystemExit(f"launch failed: {info}")
    client.delete(f"/applications/{template}/{dep_id}", headers=server.auth)
    return elapsed


def last_status(body: bytes) -> str:
    """The status in the last complete ``data:`` line of an events stream so far."""
    status = "deploying"
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            with contextlib.suppress(ValueError, AttributeError):
                status = json.loads(line[6:]).get("status", status)  # progress: no status
    return status


async def post_and_follow(url: str, template: str) -> tuple[int, str, str]:
    """POST a launch of ``template`` (one plain request, read by httptools) and follow its events
    stream until it leaves ``deploying``: the POST's HTTP status, the id and the status then
    (both empty when the POST was refused). Raises ``RequestError``."""
    answer = await request(f"{url}/applications/{template}", method="POST", seconds=120)
    if answer.status != 200:
        return answer.status, "", ""
    dep_id, status = answer.json()["id"], answer.json()["status"]
    if status == "deploying":
        events = await request(
            f"{url}/applications/{template}/{dep_id}/events",
            seconds=120,
            until=lambda body: last_status(body) != "deploying",
        )
        status = last_status(events.body)
    return answer.status, dep_id, status


def api_calls(client: httpx.Client) -> dict[str, float]:
    calls = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("binder_backend_api_calls_total{"):
            verb = line.split('verb="', 1)[1].split('"', 1)[0]
            calls[verb] = float(line.rsplit(" ", 1)[1])
    return calls


CONTROL_PLANE = ("db", "logging", "proxy", "deploy-kubernetes")
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[str, float]:
    """Process ``pid``'s name and its user + system CPU (all its threads, not its children), in
    milliseconds, from one read of ``/proc/<pid>/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    return name, (int(fields[11]) + int(fields[12])) * 1000 / TICKS


def cpu_ms(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads, not its children) in milliseconds."""
    return process_cpu(pid)[1]


def machine_busy_ms() -> float:
    """CPU time the whole machine has spent busy (all cores, ``/proc/stat``: all but idle and
    iowait), in ms."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) * 1000 / TICKS


@dataclass
class Suite:
    """A suite run as operators run it, in a scratch home."""

    home: Path
    url: str
    key: str
    pids: dict[str, int] = field(default_factory=dict)
    """Each control-plane process by its supervisord name (``deploy-kubernetes:1``)."""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": self.key}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_ms(pid) for name, pid in self.pids.items()}

    def secrets(self) -> dict[str, str]:
        lines = (self.home / "secrets.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)


@contextmanager
def running_suite(*, servers: int = 1, sandbox: bool = True, extra: str = "") -> Iterator[Suite]:
    """``binder-control start-all`` in a scratch home (``servers`` deploy servers; ``sandbox``:
    its local apps sandboxed), stopped and removed afterwards. ``extra`` is added to the
    ``[deploy]`` table."""
    binary = Path(sys.executable).parent / "binder-control"
    work = Path(tempfile.mkdtemp(prefix="binder-bench-"))
    home, config = work / "home", work / "binder.toml"
    ports = [free_port() for _ in range(5)]
    config.write_text(
        f"[db]\nport = {ports[0]}\n"
        f'[proxy]\nport = {ports[1]}\napi_port = {ports[2]}\npublic_host = "127.0.0.1:{ports[1]}"\n'
        f"[logging]\nport = {ports[3]}\n"
        f'[deploy]\nport = {ports[4]}\nhost = "127.0.0.1"\nmax_deployments = 5000\n'
        f"cull_interval_seconds = 3600\nservers = {servers}\n"
        # every launch of the benchmark comes from 127.0.0.1: lift the per-client limits
        "per_client_max_deployments = 1000\nper_client_launches_per_minute = 1000000\n"
        + extra
        + f"\n[deploy.local]\nsandbox = {'true' if sandbox else 'false'}\n"
    )
    argv = [str(binary), "--home", str(home)]
    try:
        subprocess.run(
            [*argv, "start-all", "--config", str(config)], check=True, capture_output=True
        )
        pids = {}
        for info in Supervisor(home).all_info():
            name = (
                info["group"]
                if info["group"] == info["name"]
                else f"{info['group']}:{info['name']}"
            )
            if info["group"] in CONTROL_PLANE:
                pids[name] = int(info["pid"])
        key = (home / "api-key").read_text().strip()
        yield Suite(home, f"http://127.0.0.1:{ports[4]}", key, pids)
    finally:
        subprocess.run([*argv, "stop-all"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
