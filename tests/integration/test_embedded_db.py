"""The embedded database's index catalog, read once per collection and kept
(:class:`services.embedded_db.IndexCatalog`), never answers from a catalog an index change has
made stale: on the suite's ``db`` program, each change comes after the collection's catalog was
read and kept by earlier writes and reads. Its change streams, which skip the writes their
``$match`` leaves out before making events of them
(:func:`services.embedded_db.follow_only_matched_collections`), tell every change they match, in
order, across more writes left out than one read of the oplog examines, and when resumed."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import secantus.commands
import secantus.storage
from harness import Database
from pymongo import ASCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database as MongoDatabase
from pymongo.errors import DuplicateKeyError

from services.embedded_db import CATALOG_WRITERS, followed_collections

pytestmark = pytest.mark.integration


@pytest.fixture
def db(tmp_path: Path) -> Iterator[MongoDatabase[dict[str, Any]]]:
    """A database of the suite's ``db`` program, started for the test."""
    server = Database(tmp_path).start()
    client: MongoClient[dict[str, Any]]
    with MongoClient(server.uri, serverSelectionTimeoutMS=5000, journal=True) as client:
        yield client["catalog"]
    server.stop()


@pytest.fixture
def coll(db: MongoDatabase[dict[str, Any]]) -> Collection[dict[str, Any]]:
    return db["records"]


def _warm(coll: Collection[dict[str, Any]]) -> None:
    """Writes and reads that make the server read the collection's catalog (and keep it)."""
    coll.insert_many([{"id": f"w{n}", "tags": "x", "status": "deploying"} for n in range(5)])
    coll.update_one({"id": "w0", "status": "deploying"}, {"$set": {"status": "deployed"}})
    assert coll.find_one({"id": "w0"}, {"_id": 0, "status": 1}) == {"status": "deployed"}


def test_a_unique_index_made_later_refuses_duplicates_and_none_once_dropped(
    coll: Collection[dict[str, Any]],
) -> None:
    coll.create_index([("status", ASCENDING)])
    _warm(coll)
    coll.create_index([("id", ASCENDING)], unique=True, name="by_id")
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"id": "w1"})
    coll.drop_index("by_id")
    coll.insert_one({"id": "w1"})
    assert coll.count_documents({"id": "w1"}) == 2


def test_arrays_written_after_the_catalog_was_kept_are_found_through_its_index(
    coll: Collection[dict[str, Any]],
) -> None:
    """A document with an array on an indexed field (the index becomes multikey, a mark the
    catalog is no longer kept after) is found by its elements and by a range."""
    coll.create_index([("tags", ASCENDING)])
    _warm(coll)
    assert coll.count_documents({"tags": "x"}) == 5
    coll.insert_one({"id": "arr", "tags": ["x", "y"]})
    assert [d["id"] for d in coll.find({"tags": "y"})] == ["arr"]
    assert [d["id"] for d in coll.find({"tags": {"$gt": "x"}})] == ["arr"]
    assert coll.count_documents({"tags": "x"}) == 6


def test_a_collection_dropped_and_made_again_has_only_its_new_indexes(
    coll: Collection[dict[str, Any]],
) -> None:
    coll.create_index([("id", ASCENDING)], unique=True)
    _warm(coll)
    coll.drop()
    coll.insert_many([{"id": "same"}, {"id": "same"}])  # no unique index any more
    assert coll.count_documents({"id": "same"}) == 2
    renamed = coll.database["renamed"]
    coll.delete_many({"id": "same"})
    coll.create_index([("id", ASCENDING)], unique=True, name="again")
    _warm(coll)
    coll.rename("renamed")
    with pytest.raises(DuplicateKeyError):  # the index went with the collection
        renamed.insert_one({"id": "w2"})
    coll.insert_many([{"id": "w2"}, {"id": "w2"}])  # a new collection of the old name: none


def test_the_catalogs_writers_are_the_ones_wrapped() -> None:
    """Every method of the pinned server's storage that touches the catalog's table is either
    its reader, replaced, or a writer that drops what is kept (a new version that adds one
    fails here, rather than serving a stale catalog)."""
    touching = {
        name
        for name, fn in inspect.getmembers(secantus.storage.Storage, inspect.isfunction)
        if "_IDX_TABLE" in inspect.getsource(fn)
    }
    at_start = {"__init__", "_table_kf"}  # the table's creation and key format, at start
    assert touching == {"_iter_indexes", "_maybe_mark_multikey", *CATALOG_WRITERS, *at_start}


def _changes(stream: Any, count: int) -> list[tuple[str, str, Any]]:
    """The next ``count`` changes of ``stream`` (fewer if they do not come within 10 s)."""
    seen: list[tuple[str, str, Any]] = []
    deadline = time.monotonic() + 10
    while len(seen) < count and time.monotonic() < deadline:
        change = stream.try_next()
        if change is not None:
            key = change.get("documentKey", {}).get("_id")
            seen.append((change["operationType"], change["ns"]["coll"], key))
    return seen


def test_a_stream_following_some_collections_tells_their_changes_in_order(
    db: MongoDatabase[dict[str, Any]],
) -> None:
    """Between the followed collection's changes come 450 writes to another (more than the
    200 entries one read of the oplog returns), and a transaction writes to both."""
    follow = [{"$match": {"ns.coll": {"$in": ["records"]}, "operationType": {"$ne": "x"}}}]
    everything = [{"$match": {"operationType": "insert"}}]
    with db.watch(follow, max_await_time_ms=200) as stream, db.watch(everything) as whole:
        db.records.insert_one({"_id": 1})
        db.counters.insert_many([{"_id": n} for n in range(300)])
        db.records.update_one({"_id": 1}, {"$set": {"status": "deployed"}})
        for n in range(150):
            db.counters.update_one({"_id": n}, {"$inc": {"n": 1}})
        with db.client.start_session() as session, session.start_transaction():
            db.counters.insert_one({"_id": "in a transaction"}, session=session)
            db.records.insert_one({"_id": 2}, session=session)
        db.records.delete_one({"_id": 1})
        told = _changes(stream, 4)
        assert told == [
            ("insert", "records", 1),
            ("update", "records", 1),
            ("insert", "records", 2),
            ("delete", "records", 1),
        ]
        inserts = _changes(whole, 303)  # a stream whose match names no collection: all of them
        assert {coll for _, coll, _ in inserts} == {"records", "counters"}
        resume_at = stream.resume_token
    db.records.insert_one({"_id": 3})
    db.counters.insert_one({"_id": "after"})
    with db.watch(follow, resume_after=resume_at) as resumed:
        assert _changes(resumed, 1) == [("insert", "records", 3)]
        assert resumed.try_next() is None


def test_only_a_first_match_naming_collections_narrows_a_stream() -> None:
    named = followed_collections([{"$match": {"ns.coll": {"$in": ["a", "b"]}}}])
    assert named == frozenset({"a", "b"})
    one = followed_collections([{"$match": {"ns.coll": "a", "operationType": "insert"}}])
    assert one == frozenset({"a"})
    for stages in (
        [],
        [{"$match": {"operationType": "insert"}}],
        [{"$match": {"ns.coll": {"$nin": ["a"]}}}],
        [{"$match": {"ns.coll": {"$in": ["a"], "$ne": "b"}}}],
        [{"$match": {"$or": [{"ns.coll": "a"}, {"ns.coll": "b"}]}}],
        [{"$project": {"ns": 1}}, {"$match": {"ns.coll": "a"}}],
    ):
        assert followed_collections(stages) is None


def test_the_change_streams_making_is_what_the_narrowing_relies_on() -> None:
    """The pinned server opens a change stream in ``_aggregate_change_stream``, called by its
    name, and reads the oplog through the storage its context gives, with the namespace filter
    the narrowing adds to (a new version that does otherwise fails here)."""
    source = inspect.getsource(secantus.commands)
    assert "return _aggregate_change_stream(doc, ctx, coll, pipeline, batch_size)" in source
    making = inspect.getsource(secantus.commands._aggregate_change_stream)
    assert "storage = ctx.storage" in making
    assert "storage.read_oplog_scan(" in making
    assert making.count("read_oplog") == 1
