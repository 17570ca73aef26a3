"""The embedded database's index catalog, read once per collection and kept
(:class:`services.embedded_db.IndexCatalog`), never answers from a catalog an index change has
made stale: on the suite's ``db`` program, each change comes after the collection's catalog was
read and kept by earlier writes and reads."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import secantus.storage
from harness import Database
from pymongo import ASCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from services.embedded_db import CATALOG_WRITERS

pytestmark = pytest.mark.integration


@pytest.fixture
def coll(tmp_path: Path) -> Iterator[Collection[dict[str, Any]]]:
    server = Database(tmp_path).start()
    client: MongoClient[dict[str, Any]]
    with MongoClient(server.uri, serverSelectionTimeoutMS=5000, journal=True) as client:
        yield client["catalog"]["records"]
    server.stop()


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
