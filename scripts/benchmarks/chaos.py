"""Fault injection under load, against the real suite under supervisord (see scripts/chaos).

Several clients launch, poll and delete through the deploy API while the faults run in turn:
kill -9 of each service (supervisord starts it again), the database frozen with SIGSTOP, apps
killed, and apps killed while the database is down. Then the load stops, the suite is given
time to become quiet, and the invariants are counted; every count must be 0:

- lost: an id the API answered that is not found;
- stuck: a deployment still ``deploying``;
- undeleted: an acknowledged delete that does not read ``deleted``;
- unreachable: a ``deployed`` app that does not answer through the proxy;
- unowned: an app process without a ``deployed`` record;
- server_errors: answers 500 (a 503 while a dependency is down is honest, and allowed);
- left_running: processes of the suite left after ``stop-all``, and anything of its apps'
  sandboxes (cgroups, network namespaces, links).

With ``--servers 2`` the suite runs two deploy servers on its port, and the deploy-server fault
kills the one that leads: every invariant must hold all the same, and the leader must move
(``leader_moves`` counts the kills after which the other server led within 30 s; it must equal
the kills).

Loopback only; bounded by ``--seconds`` and ``--max-launches``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import free_port, wait_for

from common.processes import alive
from services.deploy_kubernetes.backends.local.cgroups import Group
from services.deploy_kubernetes.backends.local.groups import shim_of
from services.deploy_kubernetes.backends.local.network import NETNS_DIR
from services.deploy_kubernetes.backends.local.sandboxed import suite_cgroups
from services.deploy_kubernetes.backends.local.state import suite_label

BIN = Path(sys.executable).parent / "binder-control"
FAULTS = (
    "kill db",
    "kill deploy-kubernetes",
    "freeze db",
    "kill apps",
    "kill logging",
    "kill apps while db is down",
    "kill proxy",
)


@dataclass
class Ledger:
    """What the clients were told, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    answered: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    codes: Counter[int] = field(default_factory=Counter)
    launches: int = 0
    odd: list[str] = field(default_factory=list)
    """Answers worth a look: 404 for an id the API gave out, and every 5xx."""

    def note(self, code: int, what: str = "") -> None:
        with self.lock:
            self.codes[code] += 1
            if code in (404, 409) or code >= 500:
                self.odd.append(f"{code} {what}")


class Suite:
    def __init__(self, work: Path, servers: int = 1) -> None:
        self.servers = servers
        self.home = work / "home"
        self.config = work / "chaos.toml"
        self.ports = {k: free_port() for k in ("db", "proxy", "proxy_api", "logging", "deploy")}
        self.config.write_text(
            f"[db]\nport = {self.ports['db']}\n"
            f"[proxy]\nport = {self.ports['proxy']}\napi_port = {self.ports['proxy_api']}\n"
            f'ip = "127.0.0.1"\npublic_host = "127.0.0.1:{self.ports["proxy"]}"\n'
            f"[logging]\nport = {self.ports['logging']}\n"
            f'[deploy]\nport = {self.ports["deploy"]}\nhost = "127.0.0.1"\n'
            "max_deployments = 60\nlaunch_timeout_seconds = 30\n"
            # every client of the load is 127.0.0.1: lift the per-client limits
            "per_client_max_deployments = 1000\nper_client_launches_per_minute = 1000000\n"
            f"servers = {servers}\n"
        )
        self.url = f"http://127.0.0.1:{self.ports['deploy']}"
        self.leader_kills = 0
        self.leader_moves = 0
        self.proxy_url = f"http://127.0.0.1:{self.ports['proxy']}"
        self.key = ""
        self.last_health = "not asked yet"

    def control(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN), "--home", str(self.home), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if k != "BINDER_API_KEY"},
            check=False,
        )

    def start(self) -> None:
        result = self.control("start-all")
        if result.returncode != 0:
            raise SystemExit(f"chaos: start-all failed:\n{result.stdout}{result.stderr}")
        self.key = (self.home / "api-key").read_text().strip()

    def pids(self) -> dict[str, int]:
        rows = json.loads(self.control("status", "--json").stdout or "[]")
        return {r["service"]: r["pid"] for r in rows if r.get("pid")}

    def apps(self) -> dict[str, Group]:
        """Deployment id -> the sandbox (cgroup) of every running app of this suite."""
        return _suite_apps(self.home / "run" / "local")

    def ready(self) -> bool:
        """Whether /health answers 200; what it answered last is kept in ``last_health``."""
        try:
            answer = httpx.get(self.url + "/health", timeout=2)
        except httpx.HTTPError as exc:
            self.last_health = f"{exc.__class__.__name__}: {exc}"
            return False
        self.last_health = f"{answer.status_code} {answer.text[:400]}"
        return answer.status_code == 200

    def leader(self) -> str | None:
        """The supervisord name of the deploy server that holds the leader lease."""
        for number in range(self.servers):
            path = self.home / "run" / f"deploy-kubernetes.{number}.sock"
            try:
                transport = httpx.HTTPTransport(uds=str(path))
                with httpx.Client(transport=transport, timeout=2) as client:
                    text = client.get("http://localhost/metrics").text
            except httpx.HTTPError:
                continue
            if 'binder_lease_held{lease="leader"} 1.0' in text:
                return f"deploy-kubernetes:{number}"
        return None


def client_loop(suite: Suite, ledger: Ledger, stop: threading.Event, limit: int) -> None:
    rng = random.Random()
    mine: list[str] = []
    with httpx.Client(base_url=suite.url, timeout=10) as http:
        while not stop.is_set():
            try:
                if len(mine) < 3 and ledger.launches < limit:
                    r = http.post("/applications/example")
                    ledger.note(r.status_code, f"POST {r.text[:80]}")
                    if r.status_code == 200:
                        with ledger.lock:
                            ledger.answered.add(r.json()["id"])
                            ledger.launches += 1
                        mine.append(r.json()["id"])
                elif mine:
                    dep_id = mine.pop(rng.randrange(len(mine)))
                    r = http.get(f"/applications/example/{dep_id}")
                    ledger.note(r.status_code, f"GET {dep_id} {r.text[:80]}")
                    headers = {"Authorization": suite.key}
                    r = http.delete(f"/applications/example/{dep_id}", headers=headers)
                    ledger.note(r.status_code, f"DELETE {dep_id} {r.text[:80]}")
                    if r.status_code == 200 and r.json().get("status") == "deleted":
                        with ledger.lock:
                            ledger.deleted.add(dep_id)
                    elif r.status_code != 200:
                        mine.append(dep_id)
            except httpx.HTTPError:
                pass  # a service is down: the load goes on
            stop.wait(rng.uniform(0.02, 0.1))


def inject(suite: Suite, pids: dict[str, int], fault: str, freeze_seconds: float) -> None:
    if fault == "kill deploy-kubernetes" and suite.servers > 1:
        leader = wait_for(suite.leader, timeout=30, what="a leader")
        os.kill(pids[leader], signal.SIGKILL)
        # the killed process is gone: any leader now is another process (the killed one's
        # number, restarted by supervisord, may win the lease)
        moved = wait_for(suite.leader, timeout=30, what="another server to lead")
        suite.leader_moves += bool(moved)
        suite.leader_kills += 1
    elif fault.startswith("kill ") and fault.removeprefix("kill ") in pids:
        os.kill(pids[fault.removeprefix("kill ")], signal.SIGKILL)
    elif fault == "freeze db":
        os.kill(pids["db"], signal.SIGSTOP)
        time.sleep(freeze_seconds)
        os.kill(pids["db"], signal.SIGCONT)
    elif fault.startswith("kill apps"):
        down = fault.endswith("down")
        if down:
            os.kill(pids["db"], signal.SIGSTOP)
        for group in list(suite.apps().values())[:3]:  # the app dies, its shim tells
            with contextlib.suppress(OSError):
                group.signal(signal.SIGKILL, spare=shim_of(group))
        if down:
            time.sleep(freeze_seconds)
            os.kill(pids["db"], signal.SIGCONT)


def recover_time(suite: Suite, started: float, deadline: float = 60.0) -> float:
    try:
        wait_for(suite.ready, timeout=deadline, what="the deploy server to be ready again")
    except AssertionError:  # wait_for's timeout
        print(f"chaos: /health last answered: {suite.last_health}", flush=True)
        raise
    return time.monotonic() - started


def invariants(suite: Suite, ledger: Ledger) -> dict[str, int]:
    statuses: dict[str, str] = {}
    lost = stuck = 0
    with httpx.Client(base_url=suite.url, timeout=10) as http:
        for dep_id in ledger.answered:
            r = http.get(f"/applications/example/{dep_id}")
            if r.status_code != 200:
                lost += 1
                continue
            statuses[dep_id] = r.json()["status"]
            stuck += statuses[dep_id] == "deploying"
    undeleted = {d: statuses.get(d) for d in ledger.deleted if statuses.get(d) != "deleted"}
    if undeleted:
        print(f"chaos: acknowledged deletes that do not read deleted: {undeleted}", flush=True)
    unreachable = {}
    for dep_id, status in statuses.items():
        if status == "deployed":
            code = httpx.get(f"{suite.proxy_url}/user/{dep_id}/", timeout=5).status_code
            if code != 200:
                unreachable[dep_id] = code
    if unreachable:
        print(f"chaos: deployed apps the proxy does not serve: {unreachable}", flush=True)
    label_dir = suite.home / "run" / "local"
    running = _suite_apps(label_dir)
    for dep_id in set(running) - set(statuses):  # launched, but the answer was lost
        r = httpx.get(f"{suite.url}/applications/example/{dep_id}", timeout=10)
        statuses[dep_id] = r.json()["status"] if r.status_code == 200 else f"{r.status_code}"
    strays = {d: statuses[d] for d in running if statuses[d] != "deployed"}
    unowned = len(strays)
    if strays:
        print(f"chaos: apps running without a deployed record: {strays}", flush=True)
    return {
        "lost": lost,
        "stuck": stuck,
        "undeleted": len(undeleted),
        "unreachable": len(unreachable),
        "unowned": unowned,
        "server_errors": ledger.codes.get(500, 0),
    }


def _suite_apps(state_dir: Path) -> dict[str, Group]:
    """The suite's apps that have processes, by their sandboxes' cgroups (the kernel's view)."""
    return {k: g for k, g in suite_cgroups(state_dir).apps().items() if g.procs()}


def _left_behind(state_dir: Path) -> list[str]:
    """What of the suite's sandboxes is still on the host: cgroups, namespaces, links."""
    label = suite_label(state_dir)
    cgroups = Path("/sys/fs/cgroup")
    found = [str(p) for p in [*cgroups.glob(f"binder-{label}"), *cgroups.glob(f"*/binder-{label}")]]
    found += [str(p) for p in NETNS_DIR.glob(f"b{label[:6]}-*")]
    found += [n for n in os.listdir("/sys/class/net") if n.startswith(f"b{label[:6]}")]
    return found


def wait_quiet(suite: Suite, ledger: Ledger, timeout: float) -> None:
    """Until nothing the clients launched is still deploying (or the timeout)."""

    def quiet() -> bool:
        if not suite.ready():
            return False
        with httpx.Client(base_url=suite.url, timeout=10) as http:
            r = http.get(
                "/applications/",
                params={"status": "deploying"},
                headers={"Authorization": suite.key},
            )
            return r.status_code == 200 and r.json() == []

    wait_for(quiet, timeout=timeout, interval=0.5, what="the suite to be quiet")


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="binder-chaos-"))
    suite = Suite(work, args.servers)
    suite.start()
    ledger, stop = Ledger(), threading.Event()
    clients = [
        threading.Thread(target=client_loop, args=(suite, ledger, stop, args.max_launches))
        for _ in range(args.clients)
    ]
    for thread in clients:
        thread.start()
    recoveries: dict[str, list[float]] = {}
    faults = list(FAULTS) * args.rounds
    gap = args.seconds / (len(faults) + 1)
    try:
        for fault in faults:
            time.sleep(gap)
            pids = suite.pids()
            started = time.monotonic()
            print(f"chaos: {fault}", flush=True)
            inject(suite, pids, fault, args.freeze)
            recoveries.setdefault(fault, []).append(recover_time(suite, started))
        time.sleep(gap)
    finally:
        stop.set()
        for thread in clients:
            thread.join(15)
    wait_quiet(suite, ledger, timeout=90)
    # an app killed at the very end is seen by the server within a second or two
    time.sleep(3)
    counts = invariants(suite, ledger)
    stopped = suite.control("stop-all")
    state_dir = suite.home / "run" / "local"
    left: list[object] = [pid for g in _suite_apps(state_dir).values() for pid in g.procs()]
    left += [p for p in suite.pids().values() if alive(p)] if stopped.returncode != 0 else []
    left += _left_behind(state_dir)
    if left:
        print(f"chaos: left after stop-all: {left}", flush=True)
    counts["left_running"] = len(left)
    counts["leader_not_moved"] = suite.leader_kills - suite.leader_moves
    return {
        "servers": args.servers,
        "launches": ledger.launches,
        "deletes": len(ledger.deleted),
        "faults": len(faults),
        "answers": dict(sorted(ledger.codes.items())),
        "recovery_seconds_max": {k: round(max(v), 2) for k, v in recoveries.items()},
        "invariants": counts,
        "odd_answers": ledger.odd[:20],
        "work": str(work),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--long", action="store_true", help="the long form: 3 rounds, 8 clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="times each fault is injected")
    parser.add_argument("--freeze", type=float, default=3.0, help="seconds the db stays frozen")
    parser.add_argument("--max-launches", type=int, default=2000)
    parser.add_argument(
        "--servers",
        type=int,
        default=1,
        help="deploy servers on the port (2: the leader is killed)",
    )
    args = parser.parse_args(argv)
    if args.long:
        args.seconds, args.clients, args.rounds = max(args.seconds, 300.0), 8, 3
        args.freeze = max(args.freeze, 10.0)
    result = run(args)
    for key, value in result.items():
        print(f"  {key:22} {value}")
    print(json.dumps({"bench": "chaos", **result}))
    bad = {k: v for k, v in result["invariants"].items() if v}
    if bad:
        print(f"chaos: invariants broken: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
