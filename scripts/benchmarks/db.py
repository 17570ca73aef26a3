"""`scripts/bench db`: the embedded database candidates side by side.

Each candidate runs as its own process on a free loopback port with a fresh data directory. For
each write concern it measures:

- acknowledged writes lost after kill -9: a client inserts a record and moves its status
  (``deploying`` -> ``deployed``, a compare-and-set as the deploy server's store does), counting
  each acknowledged write; the server is killed with SIGKILL mid-stream, restarted on the same
  data, and every acknowledged insert and status move is read back;
- inserts/s and find_one_and_update/s from one client (pymongo, retryWrites as the stores use it);
- the server's CPU time (utime + stime from /proc) per operation.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import free_port, port_open, wait_for
from pymongo import ASCENDING, MongoClient, ReturnDocument, WriteConcern
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from scripts.benchmarks.shared import ROOT, cpu_ms

WRITE_CONCERNS = {
    "w=1": WriteConcern(w=1),
    "j=true": WriteConcern(w=1, j=True),
    "w=majority": WriteConcern(w="majority"),
}


@dataclass(frozen=True)
class Candidate:
    name: str
    argv: Callable[[int, Path], list[str]]


def secantus_candidate(*, sync_on_commit: bool) -> Candidate:
    flag = "--sync-on-commit" if sync_on_commit else "--no-sync-on-commit"
    return Candidate(
        f"secantusdb {flag}",
        lambda port, data: [
            sys.executable,
            "-m",
            "services.embedded_db",
            "--port",
            str(port),
            "--storage-path",
            str(data),
            flag,
        ],
    )


def ferretdb_candidate(binary: Path) -> Candidate:
    return Candidate(
        "ferretdb sqlite",
        lambda port, data: [
            str(binary),
            f"--listen-addr=127.0.0.1:{port}",
            "--handler=sqlite",
            f"--sqlite-url=file:{data}/",
            f"--state-dir={data}",
            f"--debug-addr=127.0.0.1:{free_port()}",
            "--telemetry=disable",
            "--log-level=WARN",
        ],
    )


@dataclass
class Server:
    """One candidate's server process; restarts keep its port and data directory."""

    candidate: Candidate
    data: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> Server:
        with open(self.data.parent / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.candidate.argv(self.port, self.data),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        wait_for(lambda: port_open(self.port), timeout=60, what=f"{self.candidate.name} to listen")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_ms(self.proc.pid) / 1000

    def client(self) -> MongoClient[dict[str, Any]]:
        return MongoClient(
            self.uri, retryWrites=True, serverSelectionTimeoutMS=1000, socketTimeoutMS=60_000
        )


def _records(server: Server, name: str, concern: WriteConcern) -> Collection[dict[str, Any]]:
    """A collection with the deployment store's indexes, written with ``concern``."""
    client = server.client()
    coll = client["bench"].get_collection(name, write_concern=concern)
    coll.create_index([("id", ASCENDING)], unique=True)
    coll.create_index([("status", ASCENDING), ("template", ASCENDING)])
    return coll


def _record(key: str) -> dict[str, Any]:
    return {"id": key, "template": "example", "status": "deploying", "url": f"http://h/{key}/"}


def _move(coll: Collection[dict[str, Any]], key: str, source: str, to: str) -> bool:
    doc = coll.find_one_and_update(
        {"id": key, "status": source},
        {"$set": {"status": to}},
        return_document=ReturnDocument.AFTER,
    )
    return doc is not None


@dataclass
class Acked:
    inserted: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)


def _write_until_dead(coll: Collection[dict[str, Any]], acked: Acked) -> None:
    """Insert and move records until a write fails (the server was killed)."""
    n = 0
    try:
        while True:
            key = f"{n:08d}"
            coll.insert_one(_record(key))
            acked.inserted.append(key)
            if _move(coll, key, "deploying", "deployed"):
                acked.moved.append(key)
            n += 1
    except PyMongoError:
        return


def crash_round(server: Server, concern: WriteConcern, round_no: int) -> tuple[int, int]:
    """One kill -9 mid-stream; returns (acknowledged writes, of those lost)."""
    name = f"crash{round_no}"
    coll = _records(server, name, concern)
    acked = Acked()
    writer = threading.Thread(target=_write_until_dead, args=(coll, acked))
    writer.start()
    time.sleep(random.uniform(0.3, 0.8))  # let acknowledged writes stream, then crash mid-write
    server.kill9()
    writer.join(30)
    coll.database.client.close()
    server.start()
    with server.client() as client:
        stored = {
            d["id"]: d["status"]
            for d in client["bench"][name].find({}, {"_id": 0, "id": 1, "status": 1})
        }
    lost = sum(key not in stored for key in acked.inserted)
    lost += sum(stored.get(key) != "deployed" for key in acked.moved)
    return len(acked.inserted) + len(acked.moved), lost


def _timed(server: Server, seconds: float, op: Callable[[int], None]) -> tuple[float, float]:
    """Run ``op(0)``, ``op(1)``, ... for ``seconds``; returns ops/s and server CPU us per op."""
    cpu, start, n = server.cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        op(n)
        n += 1
    elapsed = time.perf_counter() - start
    return n / elapsed, (server.cpu_seconds() - cpu) / n * 1e6


def throughput(
    server: Server, concern: WriteConcern, *, seconds: float, records: int
) -> dict[str, float]:
    """Inserts/s; then status moves/s over ``records`` stored records; server CPU per op."""
    inserts = _records(server, "inserts", concern)
    moves = _records(server, "moves", concern)
    moves.insert_many([_record(f"{i:08d}") for i in range(records)])

    def insert(n: int) -> None:
        inserts.insert_one(_record(f"{n:08d}"))

    def move(n: int) -> None:
        pass_no, i = divmod(n, records)
        source, to = ("deploying", "deployed") if pass_no % 2 == 0 else ("deployed", "deploying")
        if not _move(moves, f"{i:08d}", source, to):
            raise SystemExit(f"{server.candidate.name}: status move of {i} found no record")

    figures: dict[str, float] = {}
    figures["inserts_per_s"], figures["cpu_us_per_insert"] = _timed(server, seconds, insert)
    figures["moves_per_s"], figures["cpu_us_per_move"] = _timed(server, seconds, move)
    inserts.drop()
    moves.drop()
    inserts.database.client.close()
    return figures


def measure(
    candidate: Candidate, *, rounds: int, seconds: float, records: int
) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="binder-bench-db-"))
    data = work / "data"
    data.mkdir()
    server = Server(candidate, data).start()
    rows: list[dict[str, Any]] = []
    try:
        for concern_name, concern in WRITE_CONCERNS.items():
            row: dict[str, Any] = {"candidate": candidate.name, "write_concern": concern_name}
            try:
                crashes = [
                    crash_round(server, concern, len(rows) * rounds + r) for r in range(rounds)
                ]
                row["acked"] = sum(a for a, _ in crashes)
                row["lost"] = sum(lost for _, lost in crashes)
                row["rounds_losing"] = sum(lost > 0 for _, lost in crashes)
                row.update(throughput(server, concern, seconds=seconds, records=records))
            except PyMongoError as exc:
                row["error"] = f"{exc.__class__.__name__}: {str(exc)[:120]}"
            rows.append(row)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


COLUMNS = (  # key, heading, width, format of a number
    ("candidate", "candidate", 30, ""),
    ("write_concern", "write", 11, ""),
    ("lost", "lost", 5, "d"),
    ("acked", "acked", 7, "d"),
    ("rounds_losing", "rounds losing", 13, "d"),
    ("inserts_per_s", "inserts/s", 10, ".0f"),
    ("moves_per_s", "moves/s", 8, ".0f"),
    ("cpu_us_per_insert", "cpu us/insert", 13, ".0f"),
    ("cpu_us_per_move", "cpu us/move", 11, ".0f"),
)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("  ".join(f"{head:>{w}}" if fmt else f"{head:{w}}" for _, head, w, fmt in COLUMNS))
    for row in rows:
        if "error" in row:
            print(f"{row['candidate']:30}  {row['write_concern']:11}  error: {row['error']}")
            continue
        print(
            "  ".join(
                f"{row[key]:>{w}{fmt}}" if fmt else f"{row[key]:{w}}" for key, _, w, fmt in COLUMNS
            )
        )


def bench_db(*, rounds: int, seconds: float, records: int, ferretdb: Path | None) -> None:
    candidates = [secantus_candidate(sync_on_commit=True), secantus_candidate(sync_on_commit=False)]
    if ferretdb is not None:
        candidates.append(ferretdb_candidate(ferretdb))
    print(
        f"embedded database candidates: {rounds} kill -9 rounds, {seconds:g} s of inserts and "
        f"{seconds:g} s of status moves over {records} records per write concern; one client"
    )
    rows = [
        row
        for candidate in candidates
        for row in measure(candidate, rounds=rounds, seconds=seconds, records=records)
    ]
    print_table(rows)
    if ferretdb is None:
        print("ferretdb: not measured (pass --ferretdb BINARY to add it)")
    for row in rows:
        print(json.dumps({"bench": "db", **row}))
