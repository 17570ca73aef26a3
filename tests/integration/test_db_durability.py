"""The embedded database keeps every write it acknowledged as journaled (``j=true``, as every
writer of the suite asks) through a kill -9: the suite's `db` program, run as the suite runs it,
killed right after its last acknowledged write and restarted on the same data, three rounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Database
from pymongo import ASCENDING, MongoClient, ReturnDocument

pytestmark = pytest.mark.integration

WRITES = 100
"""Records inserted, then moved `deploying` -> `deployed`, per round (two writes each)."""


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    server = Database(tmp_path).start()
    yield server
    server.stop()


def _client(db: Database) -> MongoClient[dict[str, Any]]:
    return MongoClient(db.uri, serverSelectionTimeoutMS=5000, journal=True)


def _acknowledged_writes(db: Database, round_no: int) -> dict[str, str]:
    """Insert records and move each one's status as the deploy store does; returns what each
    acknowledged record must read from now on."""
    acked: dict[str, str] = {}
    with _client(db) as client:
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


def test_acknowledged_writes_survive_kill_9(db: Database) -> None:
    acked: dict[str, str] = {}
    for round_no in range(3):
        acked |= _acknowledged_writes(db, round_no)
        db.start()
        with _client(db) as client:
            cursor = client["durability"]["deployments"].find({}, {"_id": 0, "id": 1, "status": 1})
            stored = {doc["id"]: doc["status"] for doc in cursor}
        lost = {key: want for key, want in acked.items() if stored.get(key) != want}
        assert not lost, f"round {round_no}: {len(lost)} acknowledged writes lost: {lost}"
        assert len(stored) == len(acked)
