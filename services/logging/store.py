"""Log records in MongoDB (the aggregator's only pymongo user)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.errors import BulkWriteError, PyMongoError

from common.errors import BadDatabaseError, MalformedRequestError
from services.logging.ingest import LogFilters

DUPLICATE_KEY = 11000


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


class LogStore:
    def __init__(self, *, uri: str, database: str, timeout_ms: int = 2000) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, tz_aware=True
        )
        db = self._client[database]
        self._logs = db["logs"]
        self._offsets = db["log_offsets"]

    async def open(self) -> None:
        await _db(self._logs.create_index([("service", ASCENDING), ("time", DESCENDING)]))
        await _db(self._logs.create_index([("id", ASCENDING), ("time", DESCENDING)]))
        await _db(self._logs.create_index([("time", DESCENDING), ("_id", DESCENDING)]))

    async def close(self) -> None:
        await self._client.close()

    async def ping(self) -> None:
        await _db(self._client.admin.command("ping"))

    async def insert(self, records: list[dict[str, Any]]) -> int:
        """Store ``records`` (each with a unique ``_id``); ones stored before are skipped."""
        if not records:
            return 0
        try:
            result = await self._logs.insert_many(records, ordered=False)
            return len(result.inserted_ids)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise BadDatabaseError(
                    f"database refused records: {errors[0].get('errmsg')}"
                ) from exc
            return int(exc.details.get("nInserted", 0))
        except PyMongoError as exc:
            raise BadDatabaseError(f"database unreachable: {exc.__class__.__name__}") from exc

    async def query(
        self, filters: LogFilters, *, limit: int, cursor: str | None, oldest_first: bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        query: dict[str, Any] = {}
        if filters.service:
            query["service"] = filters.service
        if filters.level:
            query["level"] = {"$in": sorted(filters.level)}
        if filters.app:
            query["id"] = filters.app
        if filters.q:
            query["message"] = {"$regex": re.escape(filters.q), "$options": "i"}
        span: dict[str, Any] = {}
        if filters.since:
            span["$gte"] = filters.since
        if filters.until:
            span["$lt"] = filters.until
        if span:
            query["time"] = span
        if cursor:
            when, rid = decode_cursor(cursor)
            op = "$gt" if oldest_first else "$lt"
            query = {
                "$and": [query, {"$or": [{"time": {op: when}}, {"time": when, "_id": {op: rid}}]}]
            }
        direction = ASCENDING if oldest_first else DESCENDING
        found = (
            self._logs.find(query).sort([("time", direction), ("_id", direction)]).limit(limit + 1)
        )
        docs = await _db(found.to_list())
        more = len(docs) > limit
        docs = docs[:limit]
        next_cursor = encode_cursor(docs[-1]["time"], docs[-1]["_id"]) if more and docs else None
        return docs, next_cursor

    async def delete_before(self, cutoff: datetime) -> int:
        result = await _db(self._logs.delete_many({"time": {"$lt": cutoff}}))
        return int(result.deleted_count)

    async def count(self) -> int:
        return int(await _db(self._logs.count_documents({})))

    async def get_offset(self, path: str) -> tuple[int, int] | None:
        doc = await _db(self._offsets.find_one({"_id": path}))
        return (int(doc["inode"]), int(doc["offset"])) if doc else None

    async def set_offset(self, path: str, inode: int, offset: int) -> None:
        await _db(
            self._offsets.replace_one(
                {"_id": path},
                {"_id": path, "inode": inode, "offset": offset, "at": datetime.now(UTC)},
                upsert=True,
            )
        )
