"""The embedded database keeps every write it acknowledged through a kill -9: the suite's `db`
program, run as the suite runs it, killed right after its last acknowledged write and restarted
on the same data, three rounds."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Proc, free_port, port_open, wait_for
from pymongo import ASCENDING, MongoClient, ReturnDocument

pytestmark = pytest.mark.integration

WRITES = 100
"""Records inserted, then moved `deploying` -> `deployed`, per round (two writes each)."""


class EmbeddedDb:
    """``python -m services.embedded_db`` with its default options, restartable on its data."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        data = workdir / "db"
        data.mkdir()
        argv = [sys.executable, "-m", "services.embedded_db", "--port", str(self.port)]
        self.proc = Proc([*argv, "--storage-path", str(data)], log=workdir / "db.log", cwd=ROOT)

    def start(self) -> EmbeddedDb:
        self.proc.start()
        wait_for(lambda: port_open(self.port), timeout=30, what="the embedded database")
        return self

    def client(self) -> MongoClient[dict[str, Any]]:
        uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        return MongoClient(uri, serverSelectionTimeoutMS=5000)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[EmbeddedDb]:
    server = EmbeddedDb(tmp_path).start()
    yield server
    server.proc.stop()


def _acknowledged_writes(db: EmbeddedDb, round_no: int) -> dict[str, str]:
    """Insert records and move each one's status as the deploy store does; returns what each
    acknowledged record must read from now on."""
    acked: dict[str, str] = {}
    with db.client() as client:
        coll = client["durability"]["deployments"]
        coll.create_index([("id", ASCENDING)], unique=True)
        for n in range(WRITES):
            key = f"{round_no}-{n}"
            coll.insert_one({"id": key, "template": "example", "status": "deploying"})
            acked[key] = "deploying"
            moved = coll.find_one_and_update(
                {"id": key, "status": "deploying"},
                {"$set": {"status": "deployed"}},
                return_document=ReturnDocument.AFTER,
            )
            assert moved is not None
            acked[key] = "deployed"
        db.proc.kill9()  # straight after the last acknowledgement, connection still open
    return acked


def test_acknowledged_writes_survive_kill_9(db: EmbeddedDb) -> None:
    acked: dict[str, str] = {}
    for round_no in range(3):
        acked |= _acknowledged_writes(db, round_no)
        db.start()
        with db.client() as client:
            cursor = client["durability"]["deployments"].find({}, {"_id": 0, "id": 1, "status": 1})
            stored = {doc["id"]: doc["status"] for doc in cursor}
        lost = {key: want for key, want in acked.items() if stored.get(key) != want}
        assert not lost, f"round {round_no}: {len(lost)} acknowledged writes lost: {lost}"
        assert len(stored) == len(acked)
