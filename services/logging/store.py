"""Log records in MongoDB (the aggregator's only pymongo user), stored in buckets.

A bucket holds the lines of one ingest batch that share a service, a deployment id and an hour:
``{_id, service, id?, hour, t0, t1, levels, n, lines: [...]}``. One document (and one entry per
index) for many lines is what makes ingest fast — the bucket pattern of MongoDB's own time-series
collections. A bucket's ``_id`` is a digest of its lines' record ids, so a batch sent twice (a
sink retrying after an answer it did not get) is stored once; a chunk of a followed file has an
``_id`` naming the file and offset it starts at, and records where it ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import bson
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReplaceOne
from pymongo.errors import BulkWriteError, PyMongoError

from common.errors import BadDatabaseError, MalformedRequestError
from services.logging.chunks import Chunk, Followed
from services.logging.ingest import LogFilters

DUPLICATE_KEY = 11000
BUCKET_KEYS = ("service", "id")


def encode_cursor(when: datetime, rid: str) -> str:
    raw = json.dumps([when.isoformat(), rid]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, rid = json.loads(raw)
        return datetime.fromisoformat(when), str(rid)
    except (ValueError, TypeError) as exc:
        raise MalformedRequestError("cursor: not a cursor this server gave out") from exc


async def _db(call: Coroutine[Any, Any, Any]) -> Any:
    try:
        return await call
    except PyMongoError as exc:
        raise BadDatabaseError(f"database unreachable: {exc.__class__.__name__}") from exc


def buckets(records: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """Records (each with ``_id``, ``time``, ``service``, maybe ``id``) grouped into buckets."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in records:
        hour = record["time"].replace(minute=0, second=0, microsecond=0)
        groups.setdefault((record["service"], record.get("id"), hour), []).append(record)
    out = []
    for (service, dep, hour), lines in groups.items():
        rids = [r["_id"] for r in lines]
        bucket: dict[str, Any] = {
            "_id": hashlib.sha256("\n".join(rids).encode()).hexdigest()[:32],
            "service": service,
            "hour": hour,
            "t0": min(r["time"] for r in lines),
            "t1": max(r["time"] for r in lines),
            "levels": sorted({r["level"] for r in lines}),
            "n": len(lines),
            "lines": [
                {"rid": r["_id"], **{k: v for k, v in r.items() if k not in ("_id", *BUCKET_KEYS)}}
                for r in lines
            ],
            **extra,
        }
        if dep is not None:
            bucket["id"] = dep
        out.append(bucket)
    return out


def chunk_bucket(chunk: Chunk) -> dict[str, Any]:
    """The bucket of a followed file's chunk (one service): its ``_id`` names the file and the
    offset the chunk starts at, and it records the offset it ends at."""
    (bucket, *more) = buckets(chunk.records, end=chunk.end)
    if more:  # a chunk spanning an hour boundary: keep it whole, in its first hour
        bucket["lines"] += [line for b in more for line in b["lines"]]
        bucket["n"] = len(bucket["lines"])
        bucket["t1"] = max(b["t1"] for b in (bucket, *more))
        bucket["levels"] = sorted({lv for b in (bucket, *more) for lv in b["levels"]})
    bucket["_id"] = chunk.chunk_id
    return bucket


def _storable(bucket: dict[str, Any]) -> dict[str, Any]:
    """``bucket``, or when no document can hold it, one that says so in its place (same id and
    end, so reading goes on after it and the gap shows)."""
    try:
        bson.encode(bucket)
    except (InvalidDocument, UnicodeError) as exc:
        first = bucket["lines"][0]
        note = {**first, "level": "error", "message": f"{bucket['n']} lines not storable: {exc}"}
        return {**bucket, "lines": [note], "n": 1, "levels": ["error"]}
    return bucket


def _line_record(bucket: dict[str, Any], line: dict[str, Any]) -> dict[str, Any]:
    record = {k: v for k, v in line.items() if k != "rid"}
    record["_id"] = line["rid"]
    record["service"] = bucket["service"]
    if "id" in bucket:
        record["id"] = bucket["id"]
    return record


class LogStore:
    def __init__(self, *, uri: str, database: str, timeout_ms: int = 2000) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            journal=True,
            # every write here is idempotent (buckets and chunks have ids of their own, offsets
            # are replaced): a write whose answer was lost is sent again by its caller, so the
            # driver's retryable writes (and the server's bookkeeping of them) are not needed
            retryWrites=False,
            tz_aware=True,
        )
        db = self._client[database]
        self._buckets = db["log_buckets"]
        self._offsets = db["log_offsets"]

    async def open(self) -> None:
        await _db(self._buckets.create_index([("service", ASCENDING), ("t1", DESCENDING)]))
        await _db(self._buckets.create_index([("id", ASCENDING), ("t1", DESCENDING)]))
        await _db(self._buckets.create_index([("t1", DESCENDING)]))

    async def close(self) -> None:
        await self._client.close()

    async def ping(self) -> None:
        await _db(self._client.admin.command("ping"))

    async def insert(self, records: list[dict[str, Any]]) -> int:
        """Store ``records``; a batch stored before is skipped. Returns the lines stored now."""
        docs = buckets(records)
        before = {d["_id"] for d in await self._insert_new(docs)}
        return sum(d["n"] for d in docs if d["_id"] not in before)

    async def insert_chunks(self, chunks: list[Chunk]) -> dict[str, int]:
        """Store the chunks of followed files, all in one insert. Returns the chunks that were
        stored before (read again after a crash), by id, with the offset each stored one ends
        at: reading goes on there. Every other chunk is stored now."""
        docs = [chunk_bucket(c) for c in chunks if c.records]
        try:
            again = {d["_id"]: int(d["end"]) for d in await self._insert_new(docs)}
        except (InvalidDocument, UnicodeError):  # one bad chunk must not stop the rest
            docs = [_storable(doc) for doc in docs]
            again = {d["_id"]: int(d["end"]) for d in await self._insert_new(docs)}
        if not again:
            return {}
        stored = await _db(
            self._buckets.find({"_id": {"$in": sorted(again)}}, {"end": 1}).to_list()
        )
        return again | {d["_id"]: int(d["end"]) for d in stored}

    async def _insert_new(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert buckets ``docs`` in one write; returns those whose ``_id`` was stored before
        (a batch or chunk sent again), which are left as they are. Anything else the database
        refuses, or a write it could not journal, is ``BadDatabaseError``."""
        if not docs:
            return []
        try:
            await self._buckets.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            refused = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if refused or exc.details.get("writeConcernErrors"):
                why = refused[0].get("errmsg") if refused else "write concern not met"
                raise BadDatabaseError(f"database refused log lines: {why}") from exc
            return [docs[e["index"]] for e in errors]
        except PyMongoError as exc:
            raise BadDatabaseError(f"database unreachable: {exc.__class__.__name__}") from exc
        return []

    async def query(
        self, filters: LogFilters, *, limit: int, cursor: str | None, oldest_first: bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of matching records and the cursor of the next (None on the last page)."""
        query: dict[str, Any] = {}
        if filters.service:
            query["service"] = filters.service
        if filters.app:
            query["id"] = filters.app
        if filters.level:
            query["levels"] = {"$in": sorted(filters.level)}
        if filters.q:
            query["lines.message"] = {"$regex": re.escape(filters.q), "$options": "i"}
        if filters.since:
            query["t1"] = {"$gte": filters.since}
        if filters.until:
            query["t0"] = {"$lt": filters.until}
        after = decode_cursor(cursor) if cursor else None
        if after is not None:
            edge = {"t1": {"$gte": after[0]}} if oldest_first else {"t0": {"$lte": after[0]}}
            query = {"$and": [query, edge]}
        order = [("t0", ASCENDING)] if oldest_first else [("t1", DESCENDING)]
        want = limit + 1
        found: list[dict[str, Any]] = []
        try:
            async for bucket in self._buckets.find(query).sort(order).batch_size(100):
                edge_time = bucket["t0"] if oldest_first else bucket["t1"]
                if len(found) >= want:  # no later bucket can hold a line that ranks higher
                    found = _ranked(found, oldest_first)[:want]
                    kth = found[-1]["time"]
                    if (edge_time > kth) if oldest_first else (edge_time < kth):
                        break
                found += [
                    r
                    for line in bucket["lines"]
                    if _keep(r := _line_record(bucket, line), filters, after, oldest_first)
                ]
        except PyMongoError as exc:
            raise BadDatabaseError(f"database unreachable: {exc.__class__.__name__}") from exc
        page = _ranked(found, oldest_first)[:want]
        more = len(page) > limit
        page = page[:limit]
        next_cursor = encode_cursor(page[-1]["time"], page[-1]["_id"]) if more and page else None
        return page, next_cursor

    async def delete_before(self, cutoff: datetime) -> int:
        """Remove the buckets whose every line is older than ``cutoff``; returns lines removed."""
        old = await _db(self._buckets.find({"t1": {"$lt": cutoff}}, {"n": 1}).to_list())
        if not old:
            return 0
        await _db(self._buckets.delete_many({"_id": {"$in": [b["_id"] for b in old]}}))
        return sum(int(b["n"]) for b in old)

    async def count(self) -> int:
        cursor = await _db(
            self._buckets.aggregate([{"$group": {"_id": None, "n": {"$sum": "$n"}}}])
        )
        rows = await _db(cursor.to_list())
        return int(rows[0]["n"]) if rows else 0

    async def get_offsets(self, paths: list[str]) -> dict[str, Followed]:
        """Where reading each of ``paths`` goes on, for those read before (one query)."""
        if not paths:
            return {}
        docs = await _db(self._offsets.find({"_id": {"$in": paths}}).to_list())
        return {d["_id"]: Followed(inode=int(d["inode"]), offset=int(d["offset"])) for d in docs}

    async def forget_offsets(self, paths: list[str]) -> None:
        """Forget where reading ``paths`` went on (files removed once read)."""
        if paths:
            await _db(self._offsets.delete_many({"_id": {"$in": paths}}))

    async def set_offsets(self, offsets: dict[str, Followed]) -> None:
        """Record where reading each followed file goes on (one write for all)."""
        if not offsets:
            return
        now = datetime.now(UTC)
        await _db(
            self._offsets.bulk_write(
                [
                    ReplaceOne(
                        {"_id": path},
                        {"_id": path, "inode": f.inode, "offset": f.offset, "at": now},
                        upsert=True,
                    )
                    for path, f in offsets.items()
                ],
                ordered=False,
            )
        )


def _keep(
    record: dict[str, Any], f: LogFilters, after: tuple[datetime, str] | None, oldest_first: bool
) -> bool:
    if not f.matches(record):
        return False
    if after is None:
        return True
    key = (record["time"], record["_id"])
    return key > after if oldest_first else key < after


def _ranked(records: list[dict[str, Any]], oldest_first: bool) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r["time"], r["_id"]), reverse=not oldest_first)
