"""The embedded database keeps every write it acknowledged as journaled (``j=true``, as every
writer of the suite asks) through a kill -9: the suite's `db` program, run as the suite runs it,
killed right after its last acknowledged write and restarted on the same data, three rounds. And
a transaction whose client was killed inside it does not hold what it wrote for long."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Database, wait_for
from pymongo import ASCENDING, MongoClient, ReturnDocument
from pymongo.errors import OperationFailure

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


LEFT_OPEN = """
import sys, time
from pymongo import MongoClient
client = MongoClient(sys.stdin.readline().strip())
with client.start_session() as session:
    session.start_transaction()
    client["txn"]["counters"].update_one(
        {"_id": "active"}, {"$inc": {"n": 1}}, upsert=True, session=session
    )
    print("in", flush=True)
    time.sleep(3600)
"""


def _count_in(client: MongoClient[dict[str, Any]]) -> bool:
    """One transaction writing the counter, as the store counts a deployment in or out;
    whether it committed (False: it conflicted with another writer's open transaction)."""
    try:
        with client.start_session() as session, session.start_transaction():
            client["txn"]["counters"].update_one(
                {"_id": "active"}, {"$inc": {"n": 1}}, upsert=True, session=session
            )
    except OperationFailure as exc:
        if exc.has_error_label("TransientTransactionError"):
            return False
        raise
    return True


def test_a_transaction_whose_client_was_killed_frees_what_it_wrote_within_seconds(
    db: Database,
) -> None:
    """A deploy server killed with -9 inside a transaction (its counter written, no commit): the
    other servers' transactions on that counter conflict only until the database rolls it back,
    seconds later, not for the minute of the server's default lifetime."""
    with _client(db) as client:
        client["txn"]["counters"].insert_one({"_id": "active", "n": 0})
        with subprocess.Popen(
            [sys.executable, "-c", LEFT_OPEN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as writer:
            try:
                assert writer.stdin is not None
                assert writer.stdout is not None
                writer.stdin.write(db.uri + "\n")  # the credentials: never in argv
                writer.stdin.flush()
                assert writer.stdout.readline().strip() == "in"
            finally:
                writer.kill()
        assert not _count_in(client), "the killed client's transaction holds the counter"
        wait_for(
            lambda: _count_in(client),
            timeout=20,  # seconds, where the server's default lifetime is a minute
            interval=0.2,
            what="the counter written again",
        )
        assert client["txn"]["counters"].find_one({"_id": "active"}) == {"_id": "active", "n": 1}
