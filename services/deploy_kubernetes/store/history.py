"""Months of ended records, read at the cost of a page: every record that ends takes the next
number of two sequences in the transaction that ends it, the suite's (``ended_seq``) and its
template's (``template_seq``, ``<template>/<number>``), each under a unique index. A page of the
newest ended records is the numbers below the sequence's last, looked up by key; retention walks
the oldest numbers up.

Why not an index on the end time, sorted: the embedded database sorts every match of a query
before it limits (measured over 100,000 ended records: 8 to 90 s for the newest 1,000, with the
index hinted), while a lookup of 1,000 keys examines 1,000 documents. A sort on a real MongoDB
would do as well; the sequences cost it nothing either.

Records that ended before the sequences existed have no number: they are read by id as before,
and are not listed.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection

from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.models import Deployment, Status

ENDED = "ended"
RETAINED = "retained"
"""The counter of the lowest number retention has not removed."""
WINDOW = 500
"""Numbers looked at in one step of retention."""


def _template_key(template: str, number: int) -> str:
    return f"{template}/{number:012d}"


def encode_cursor(number: int) -> str:
    return f"e{number}"


def decode_cursor(cursor: str) -> int:
    if not cursor.startswith("e") or not cursor[1:].isdigit() or len(cursor) > 20:
        raise MalformedRequestError("cursor: not a cursor this server gave out")
    return int(cursor[1:])


class MongoHistory:
    def __init__(
        self, *, deps: AsyncCollection[dict[str, Any]], counters: AsyncCollection[dict[str, Any]]
    ) -> None:
        self._deps = deps
        self._counters = counters

    async def create_indexes(self) -> None:
        await self._deps.create_index([("ended_seq", ASCENDING)], unique=True, sparse=True)
        await self._deps.create_index([("template_seq", ASCENDING)], unique=True, sparse=True)

    async def _take(self, session: AsyncClientSession, key: str, count: int) -> list[int]:
        """The next ``count`` numbers of sequence ``key``, in order."""
        doc = await self._counters.find_one_and_update(
            {"_id": key},
            {"$inc": {"n": count}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        assert doc is not None
        last = int(doc["n"])
        return list(range(last - count + 1, last + 1))

    async def numbers_of(
        self, session: AsyncClientSession, ending: list[tuple[str, Status]]
    ) -> list[dict[str, Any]]:
        """The numbers of the records that end now (their templates and final statuses, in
        the transaction that ends them, in order), and their statuses counted: one step per
        sequence and per status, however many end together."""
        if not ending:
            return []
        ended = await self._take(session, ENDED, len(ending))
        templates = Counter(template for template, _ in ending)
        own = {t: iter(await self._take(session, f"{ENDED}:{t}", n)) for t, n in templates.items()}
        for to, n in Counter(to for _, to in ending).items():
            await self._counters.update_one(
                {"_id": f"{ENDED}-status:{to.value}"},
                {"$inc": {"n": n}},
                upsert=True,
                session=session,
            )
        return [
            {"ended_seq": number, "template_seq": _template_key(template, next(own[template]))}
            for number, (template, _) in zip(ended, ending, strict=True)
        ]

    async def _last(self, key: str) -> int:
        doc = await self._counters.find_one({"_id": key})
        return int(doc["n"]) if doc else 0

    async def by_numbers(self, *, template: str | None, numbers: list[int]) -> list[Deployment]:
        query: dict[str, Any] = (
            {"ended_seq": {"$in": numbers}}
            if template is None
            else {"template_seq": {"$in": [_template_key(template, n) for n in numbers]}}
        )
        return [Deployment.from_doc(d) async for d in self._deps.find(query, {"_id": 0})]

    async def range(self, template: str | None) -> tuple[int, int]:
        """(the lowest number retention kept, the last number) of ``template``'s sequence or
        the suite's; retention is known for the suite's only (a template's starts at 1)."""
        last = await self._last(ENDED if template is None else f"{ENDED}:{template}")
        return (max(1, await self._last(RETAINED)) if template is None else 1), last

    async def newest(
        self, *, template: str | None, status: Status | None, room: int, cursor: str | None
    ) -> tuple[list[Deployment], str | None]:
        """Up to ``room`` ended records, newest first, from ``cursor`` (a number) down; and the
        cursor of the rest (None: none left)."""
        if room <= 0:
            return [], None
        key = ENDED if template is None else f"{ENDED}:{template}"
        start = decode_cursor(cursor) if cursor is not None else await self._last(key)
        low = max(1, start - room + 1)
        numbers = list(range(start, low - 1, -1))
        query: dict[str, Any] = (
            {"ended_seq": {"$in": numbers}}
            if template is None
            else {"template_seq": {"$in": [_template_key(template, n) for n in numbers]}}
        )
        query["pooled"] = False
        if status is not None:
            query["status"] = status.value
        found = [Deployment.from_doc(d) async for d in self._deps.find(query, {"_id": 0})]
        return found, encode_cursor(low - 1) if low > 1 else None

    async def fill(
        self, *, template: str | None, status: Status | None, room: int, skip: int = 0
    ) -> list[Deployment]:
        """The newest ``room`` ended records (of ``status`` when given), after the newest
        ``skip`` numbers; a status filter looks through at most 20 windows of numbers."""
        key = ENDED if template is None else f"{ENDED}:{template}"
        start = await self._last(key) - skip
        out: list[Deployment] = []
        for _ in range(20 if status is not None else 1):
            if start < 1 or len(out) >= room:
                break
            found, _ = await self.newest(
                template=template, status=status, room=room, cursor=encode_cursor(start)
            )
            out += sorted(found, key=lambda d: -int(d.ended_seq or 0))
            start -= room
        return out[:room]

    async def ended_total(self, template: str | None) -> int:
        """Records that ended (of ``template``), retention apart when of every template."""
        if template is not None:
            return await self._last(f"{ENDED}:{template}")
        return sum((await self.status_counts()).values())

    async def status_counts(self) -> dict[str, int]:
        """Ended records counted by status (what retention removed apart)."""
        keys = [f"{ENDED}-status:{s.value}" for s in Status if s.final]
        counts = {s.value: 0 for s in Status if s.final}
        async for doc in self._counters.find({"_id": {"$in": keys}}):
            counts[str(doc["_id"]).rsplit(":", 1)[1]] = int(doc["n"])
        return counts

    async def oldest(self, before: datetime) -> tuple[list[dict[str, Any]], int]:
        """From the lowest number retention has not removed: the records that ended before
        ``before``, oldest first, stopping at the first that did not (at most a window of
        them); and the number retention is at after them."""
        low = max(1, await self._last(RETAINED))
        last = await self._last(ENDED)
        out: list[dict[str, Any]] = []
        while low <= last and len(out) < WINDOW:
            numbers = range(low, min(low + WINDOW, last + 1))
            found = self._deps.find(
                {"ended_seq": {"$in": list(numbers)}},
                {"_id": 0, "id": 1, "ended_seq": 1, "ended_at": 1, "created": 1, "status": 1},
            )
            by_number = {int(d["ended_seq"]): d async for d in found}
            for number in numbers:
                doc = by_number.get(number)
                if doc is not None:
                    if (doc.get("ended_at") or doc["created"]) >= before:
                        return out, number
                    out.append(doc)
                low = number + 1  # removed already (a hole), or to be removed now
        return out, low

    async def removed(
        self, session: AsyncClientSession, docs: list[dict[str, Any]], retained: int
    ) -> None:
        """Count ``docs`` out of the status counts and move retention on (in the transaction
        that removes them)."""
        await self._counters.update_one(
            {"_id": RETAINED}, {"$set": {"n": retained}}, upsert=True, session=session
        )
        for status, count in Counter(str(d["status"]) for d in docs).items():
            await self._counters.update_one(
                {"_id": f"{ENDED}-status:{status}"}, {"$inc": {"n": -count}}, session=session
            )
