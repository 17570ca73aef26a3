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
- left_running: processes of the suite left after ``stop-all``.

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from harness import free_port, wait_for  # noqa: E402

from common.processes import alive, session_leaders_with  # noqa: E402
from services.deploy_kubernetes.backends.local import suite_label  # noqa: E402

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
    def __init__(self, work: Path) -> None:
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
        )
        self.url = f"http://127.0.0.1:{self.ports['deploy']}"
        self.proxy_url = f"http://127.0.0.1:{self.ports['proxy']}"
        self.key = ""

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

    def apps(self) -> dict[str, int]:
        """Deployment id -> pid of every app of this suite, found by its environment."""
        out = {}
        for path in (self.home / "run" / "local").glob("*.json"):
            try:
                out[path.stem] = int(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue
        return {k: v for k, v in out.items() if alive(v)}

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


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
    if fault.startswith("kill ") and fault.removeprefix("kill ") in pids:
        os.kill(pids[fault.removeprefix("kill ")], signal.SIGKILL)
    elif fault == "freeze db":
        os.kill(pids["db"], signal.SIGSTOP)
        time.sleep(freeze_seconds)
        os.kill(pids["db"], signal.SIGCONT)
    elif fault.startswith("kill apps"):
        down = fault.endswith("down")
        if down:
            os.kill(pids["db"], signal.SIGSTOP)
        for pid in list(suite.apps().values())[:3]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if down:
            time.sleep(freeze_seconds)
            os.kill(pids["db"], signal.SIGCONT)


def recover_time(suite: Suite, started: float, deadline: float = 60.0) -> float:
    wait_for(suite.ready, timeout=deadline, what="the deploy server to be ready again")
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


def _suite_apps(state_dir: Path) -> dict[str, int]:
    label = suite_label(state_dir)
    return {
        env.get("BINDER_ID", ""): pid
        for pid, env in session_leaders_with("BINDER_SUITE", label).items()
    }


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
    suite = Suite(work)
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
    left = list(_suite_apps(suite.home / "run" / "local").values())
    left += [p for p in suite.pids().values() if alive(p)] if stopped.returncode != 0 else []
    counts["left_running"] = len(left)
    return {
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
