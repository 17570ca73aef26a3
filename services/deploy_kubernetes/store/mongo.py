""":class:`MongoStore`: the store port on MongoDB (pymongo's async client; the only pymongo user
of the deploy server). Every database failure becomes ``BadDatabaseError``.

Writes are acknowledged only once journaled (``j=True``), and every operation has a deadline
(``timeoutMS``), so a frozen database answers 503 instead of hanging a request.

Every operation here may run twice with the same outcome (a move is guarded by the status it
leaves and read back when it matched nothing, a claim checks whether an earlier try won, an
insert that finds its own record took), so an operation whose connection broke under it (the
database restarted) is run once more here (:func:`_translated`): what the driver's retryable
writes would do, without the server's per-write session bookkeeping, which cost the embedded
server a quarter of its CPU per write (1.9 against 1.4 ms) and the caller half a millisecond.
``tests/unit/test_store_retry.py`` holds the retry's behaviour; the store contract suite runs
writes across a real restart of the database. Exit condition for the retry: delete it, and let
the driver retry (``retryWrites=True``), when the embedded server's session bookkeeping costs
about nothing per write, or when the embedded server is no longer the suite's default database.

Compare-and-set moves are an ``update_one`` guarded by the status, rather than one
``find_one_and_update``: the embedded server scans the whole collection for the latter (measured:
31 ms of its CPU per move over 3,200 records, against 1.4 ms for ``update_one`` and ``find_one``).
When the caller knows the record as last written (the one owner of deployment state does), a move
that matched needs no read back: the record is the known one with the change applied. A pooled
claim is one guarded ``update_one`` alone, for the same reason (in a transaction with the
client's count when the claim counts towards a client).

Several servers share the records: what must be exact across them is written in one transaction
with the record it is about (:mod:`.transactions`): the counts of active deployments (total, per
template, per client) are counter documents moved in the transaction that inserts a record and
in the one that moves it to a final status, so no crash leaves them wrong. A leader's write
(:data:`~.base.FENCE` set) also checks, in its transaction, that the leader's lease is still its
own and unexpired, so a stalled ex-leader's late write fails. A server's admissions that come
together go in one transaction, and so do its ends (moves to a final status) and its progress
messages in one insert (:class:`~.transactions.Batches`): a burst's would otherwise conflict on the
same counters, each transaction retried. Each server follows the writes of records and templates
and the other servers' progress through one change stream (:meth:`MongoStore.events`).
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import pymongo
from loguru import logger
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, WriteConcern
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DuplicateKeyError,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from services.deploy_kubernetes.errors import (
    BadDatabaseError,
    ConflictError,
    FencedError,
)
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    Template,
    now,
    parse_template,
    sources_of,
)
from services.deploy_kubernetes.store.base import (
    ACTIVE,
    FENCE,
    Admission,
    Change,
    Counts,
    Event,
    Fence,
    Refusal,
    Search,
)
from services.deploy_kubernetes.store.history import MongoHistory
from services.deploy_kubernetes.store.transactions import Abort, Batches, Conflict, in_transaction

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
A = TypeVar("A")

TOTAL = "total"
DUPLICATE_KEY = 11000
INDEX_SECONDS = 600
SORT_FIELDS = {
    "created": ["created"],
    "status": ["status", "created"],
    "template": ["template", "created"],
    "last-activity": ["last_activity", "created"],
    "id": ["id"],
}
PROGRESS_KEPT_SECONDS = 3600
FOLLOWED = ("deployments", "progress", "templates")
AWAIT_SECONDS = 1.0
"""How long a read of the change stream waits for a change (its getMore's ``maxAwaitTimeMS``)."""
EMPTY_PAUSE_SECONDS = 0.1
"""After a read of the change stream that came back empty before its wait was over, this pause
before the next. The embedded server ends a read at the first write anywhere, one that the
stream's filter leaves out too (any database's: the counters', the leases', the log
aggregator's records), where ``mongod`` waits for a change it would tell: each server made a
round trip per write of the whole database (measured: 165 reads for 200 writes elsewhere,
costing the database 0.4 ms and the follower 0.25 ms of CPU per write; 0.15 and 0.05 with the
pause). A change comes at most this much later to a server that did not make it (its own are
applied when written); against ``mongod`` an empty read has waited its whole time, and there is
no pause."""
"""The collections whose changes a server follows (:meth:`MongoStore.events`)."""
HISTORY_LOST = (136, 280, 286)
"""Codes of a change stream that cannot resume where it was (its history is gone)."""


class _Fenced(Exception):
    pass


async def _fenced_batch(
    batchers: dict[Fence | None, Batches[T, A | Exception]],
    run: Callable[[list[T]], Awaitable[list[A | Exception]]],
    name: str,
    item: T,
) -> A:
    """``item`` through ``run`` with the items that come with it: a leader's go together,
    fenced (the batch's worker runs in the context of its first submitter); the others
    together. An exception answered for ``item`` alone is raised here."""
    fence = FENCE.get()
    batches = batchers.get(fence)
    if batches is None:
        batches = batchers[fence] = Batches(run, name=name)
    answer = await batches.submit(item)
    if isinstance(answer, Exception):
        raise answer
    return answer


@dataclass(frozen=True)
class _Move:
    """A record's move to a status that is not final (:meth:`MongoStore.move`)."""

    dep_id: str
    to: Status
    change: Change
    known: Deployment | None


@dataclass(frozen=True)
class _End:
    """A record's move to a final status (:meth:`MongoStore.move`)."""

    dep_id: str
    to: Status
    change: Change


def _translated(func: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            try:
                return await func(*args, **kwargs)
            except AutoReconnect as exc:
                if isinstance(exc, NetworkTimeout | ServerSelectionTimeoutError):
                    raise  # out of time, or no server to try again on
                return await func(*args, **kwargs)  # its connection broke: once more
        except _Fenced as exc:
            raise FencedError("this server's lease has passed: the write is refused") from exc
        except DuplicateKeyError as exc:
            raise ConflictError("a record with that id exists already") from exc
        except PyMongoError as exc:
            raise BadDatabaseError(f"database unreachable: {exc.__class__.__name__}") from exc

    return wrapper


def _ms() -> int:
    return int(time.time() * 1000)


def _keys(template: str, client: str | None) -> list[str]:
    """The counters a record counts towards."""
    keys = [TOTAL, f"template:{template}"]
    return keys if client is None else [*keys, f"client:{client}"]


def _refusal(admission: Admission, counts: dict[str, int]) -> Refusal | None:
    dep = admission.dep
    if (
        admission.client_limit is not None
        and dep.client is not None
        and counts.get(f"client:{dep.client}", 0) >= admission.client_limit
    ):
        return Refusal.CLIENT
    if counts.get(TOTAL, 0) >= admission.max_total:
        return Refusal.TOTAL
    limit = admission.template_limit
    if limit is not None and counts.get(f"template:{dep.template}", 0) >= limit:
        return Refusal.TEMPLATE
    return None


def _newest_first(dep: Deployment) -> tuple[float, str]:
    return (-dep.created.timestamp(), dep.id)


class MongoStore:
    """:class:`Store`, :class:`Leases` and :class:`Sessions` on a MongoDB server (or the
    embedded wire-compatible one)."""

    def __init__(self, *, uri: str, database: str, timeout_ms: int = 2000) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            timeoutMS=2 * timeout_ms,
            journal=True,
            retryWrites=False,  # retried here instead (see the module's docstring)
            tz_aware=True,
        )
        db = self._client[database]
        self._db = db
        self._deps = db["deployments"]
        self._templates = db["templates"]
        self._counters = db["counters"]
        self._leases = db["leases"]
        self._sessions = db["console_sessions"]
        lossy = WriteConcern(w=1, j=False)  # lost in a crash of the database, and harmless
        self._servers = db.get_collection("servers", write_concern=lossy)
        self._progress = db.get_collection("progress", write_concern=lossy)
        self._history = MongoHistory(deps=self._deps, counters=self._counters)
        self._me = secrets.token_hex(8)
        """Marks this store's progress messages, which its own change stream leaves out."""
        self._told: Batches[dict[str, Any], None] = Batches(self._tell, name="progress")
        """Progress messages in batches: a burst's pods report their Scheduled, Pulled and
        Started within milliseconds of each other; one insert, not one each."""
        self._admissions: dict[Fence | None, Batches[Admission, Refusal | Exception | None]] = {}
        """Admissions in batches, one batcher per fence (its worker writes under it)."""
        self._ends: dict[Fence | None, Batches[_End, Deployment | Exception | None]] = {}
        """Ends (moves to a final status) in batches, likewise."""
        self._moves: dict[Fence | None, Batches[_Move, Deployment | Exception | None]] = {}
        """The other moves in batches, likewise (:meth:`_move_batch`)."""

    @_translated
    async def open(self) -> None:
        with pymongo.timeout(INDEX_SECONDS):  # a new index over months of records takes a while
            await self._create_indexes()
        await self._seed_counters()

    async def _create_indexes(self) -> None:
        await self._deps.create_index([("id", ASCENDING)], unique=True)
        await self._deps.create_index([("status", ASCENDING), ("template", ASCENDING)])
        await self._deps.create_index([("template", ASCENDING), ("created", DESCENDING)])
        await self._history.create_indexes()
        await self._templates.create_index([("name", ASCENDING)], unique=True)
        await self._sessions.create_index([("expires", ASCENDING)], expireAfterSeconds=0)
        await self._progress.create_index(
            [("at", ASCENDING)], expireAfterSeconds=PROGRESS_KEPT_SECONDS
        )

    async def _seed_counters(self) -> None:
        """Count the active records once, when the counters are not there yet (a database of
        an earlier version, or a new one)."""
        if await self._counters.find_one({"_id": TOTAL}) is not None:
            return

        async def body(session: AsyncClientSession, attempt: int) -> None:
            counts: dict[str, int] = {TOTAL: 0}
            query = {"status": {"$in": [s.value for s in ACTIVE]}}
            async for doc in self._deps.find(query, {"template": 1, "client": 1}, session=session):
                for key in _keys(doc["template"], doc.get("client")):
                    counts[key] = counts.get(key, 0) + 1
            await self._counters.insert_many(
                [{"_id": k, "n": n} for k, n in counts.items()], session=session
            )

        try:
            await in_transaction(self._client, body)
        except DuplicateKeyError:
            return  # another server seeded them

    async def close(self) -> None:
        await self._client.close()

    @_translated
    async def ping(self) -> None:
        await self._client.admin.command("ping")

    async def _fence(self, session: AsyncClientSession) -> None:
        """In a leader's write: its lease must still be its own and unexpired."""
        fence = FENCE.get()
        if fence is None:
            return
        held = {"_id": fence.name, "holder": fence.holder, "epoch": fence.epoch}
        done = await self._leases.update_one(
            {**held, "until": {"$gt": _ms()}}, {"$inc": {"writes": 1}}, session=session
        )
        if not done.matched_count:
            raise _Fenced

    # --- records and their counts ---------------------------------------------------------------

    @_translated
    async def insert(self, dep: Deployment) -> None:
        refusal = await self._admit(Admission(dep=dep, max_total=2**62))
        assert refusal is None

    @_translated
    async def admit(self, admission: Admission) -> Refusal | None:
        return await self._admit(admission)

    async def _admit(self, admission: Admission) -> Refusal | None:
        return await _fenced_batch(self._admissions, self._admit_batch, "admissions", admission)

    async def _admit_batch(self, batch: list[Admission]) -> list[Refusal | Exception | None]:
        """Count in and insert every admission of ``batch`` that fits, in one transaction; an
        admission whose id exists already answers ``ConflictError``."""
        duplicates = False

        async def body(
            session: AsyncClientSession, attempt: int
        ) -> list[Refusal | Exception | None]:
            nonlocal duplicates
            await self._fence(session)
            ids = [a.dep.id for a in batch]
            existing: set[str] = set()
            if attempt:  # an earlier run may have committed before its answer was lost
                found_ids = self._deps.find({"id": {"$in": ids}}, {"id": 1}, session=session)
                existing = {d["id"] async for d in found_ids}
            keys = sorted({k for a in batch for k in _keys(a.dep.template, a.dep.client)})
            found = {
                d["_id"]: int(d["n"])
                async for d in self._counters.find({"_id": {"$in": keys}}, session=session)
            }
            counts = dict(found)
            answers: list[Refusal | Exception | None] = []
            docs = []
            for admission in batch:
                if admission.dep.id in existing:  # there before (a duplicate), or landed
                    answers.append(
                        ConflictError("a record with that id exists already")
                        if duplicates
                        else None
                    )
                    continue
                refusal = _refusal(admission, counts)
                answers.append(refusal)
                if refusal is None:
                    for key in _keys(admission.dep.template, admission.dep.client):
                        counts[key] = counts.get(key, 0) + 1
                    docs.append(admission.dep.to_doc())
            for key in keys:
                await self._set_count(session, key, found.get(key), counts.get(key, 0))
            if docs:
                try:
                    await self._deps.insert_many(docs, session=session)
                except BulkWriteError as exc:
                    if any(e.get("code") != DUPLICATE_KEY for e in exc.details["writeErrors"]):
                        raise
                    duplicates = True  # nothing committed: the next run tells which
                    raise Conflict from exc
            return answers

        return await in_transaction(self._client, body)

    async def _set_count(
        self, session: AsyncClientSession, key: str, old: int | None, new: int
    ) -> None:
        """Set counter ``key`` from ``old`` (as read in this transaction; None: missing)."""
        if old is None:
            if new:
                await self._counters.insert_one({"_id": key, "n": new}, session=session)
            return
        if new != old:
            done = await self._counters.update_one(
                {"_id": key, "n": old}, {"$set": {"n": new}}, session=session
            )
            if not done.matched_count:
                raise Conflict

    @_translated
    async def counts(self) -> Counts:
        total, templates, clients = 0, {}, {}
        async for doc in self._counters.find({"n": {"$gt": 0}}):
            key, n = str(doc["_id"]), int(doc["n"])
            if key == TOTAL:
                total = n
            elif key.startswith("template:"):
                templates[key.removeprefix("template:")] = n
            elif key.startswith("client:"):
                clients[key.removeprefix("client:")] = n
        return Counts(total=total, templates=templates, clients=clients)

    @_translated
    async def get(self, dep_id: str) -> Deployment | None:
        doc = await self._deps.find_one({"id": dep_id}, {"_id": 0})
        return Deployment.from_doc(doc) if doc else None

    @_translated
    async def move(
        self, dep_id: str, to: Status, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        if to.final:
            return await self._end(_End(dep_id, to, change))
        move = _Move(dep_id, to, change, known)
        return await _fenced_batch(self._moves, self._move_batch, "moves", move)

    async def _move_batch(self, batch: list[_Move]) -> list[Deployment | Exception | None]:
        """The moves of ``batch`` in one transaction, whose commit is one journal flush; a move
        alone and unfenced in one write, as journaled.

        Why: the embedded server holds a collection's lock through each journaled write to it,
        its journal flush included, so the records' writes go one flush after the other. The
        moves to ``deployed`` of a burst of 50 on the Kubernetes test node come within a few
        hundred milliseconds of each other, while the node writes to the same disk: each waited
        for the flushes of those before it, 121 ms from the route added to the record moved
        (median), 395 ms at most, against 4 ms in a burst of 10 (the server's own timestamps)."""
        if len(batch) == 1 and FENCE.get() is None:
            return [await self._move(batch[0], None)]

        async def body(
            session: AsyncClientSession, attempt: int
        ) -> list[Deployment | Exception | None]:
            await self._fence(session)
            return [await self._move(move, session) for move in batch]

        return await in_transaction(self._client, body)

    async def _move(self, move: _Move, session: AsyncClientSession | None) -> Deployment | None:
        sources = [s.value for s in sources_of(move.to)]
        done = await self._deps.update_one(
            {"id": move.dep_id, "status": {"$in": sources}},
            {"$set": {**move.change.values(), "status": move.to.value}},
            session=session,
        )
        known = move.known
        if done.matched_count and known is not None and known.id == move.dep_id:
            return known.evolve(status=move.to, **move.change.values())
        # moved now, or earlier by a retried write that landed: either way it is at `to`
        found = await self._deps.find_one(
            {"id": move.dep_id, "status": move.to.value}, {"_id": 0}, session=session
        )
        return Deployment.from_doc(found) if found else None

    async def _end(self, end: _End) -> Deployment | None:
        return await _fenced_batch(self._ends, self._end_batch, "ends", end)

    async def _end_batch(self, batch: list[_End]) -> list[Deployment | Exception | None]:
        """Move each record of ``batch`` to its final status and count it out, in one
        transaction: ends that come together (a burst deleted, the culler's round) take their
        numbers and count out in one step each, instead of conflicting on the same counters
        one transaction each, retried with backoff (a run of the Kubernetes bench, about 70
        launches deleted, 50 of them at once: 868 transactions aborted on a conflict before,
        3 after). A record ended twice in a batch is ended by the first."""

        async def body(
            session: AsyncClientSession, attempt: int
        ) -> list[Deployment | Exception | None]:
            await self._fence(session)
            ids = list({e.dep_id for e in batch})
            docs = {
                d["id"]: d
                async for d in self._deps.find({"id": {"$in": ids}}, {"_id": 0}, session=session)
            }
            answers: list[Deployment | _End | None] = []
            """Each end's answer; an end of a record another end of the batch ends: that one."""
            ending: list[tuple[_End, dict[str, Any]]] = []
            by: dict[str, _End] = {}
            for end in batch:
                doc = docs.get(end.dep_id)
                first = by.get(end.dep_id)
                if first is not None:  # ended by ``first``: its answer, if the same status
                    answers.append(first if first.to is end.to else None)
                elif doc is None:
                    answers.append(None)
                elif doc["status"] == end.to.value:  # a retried move that landed already
                    answers.append(Deployment.from_doc(doc))
                elif doc["status"] not in {s.value for s in sources_of(end.to)}:
                    answers.append(None)
                else:
                    ending.append((end, doc))
                    by[end.dep_id] = end
                    answers.append(end)
            numbers = await self._history.numbers_of(
                session, [(doc["template"], end.to) for end, doc in ending]
            )
            ended: dict[str, Deployment] = {}
            out: Counter[str] = Counter()
            for (end, doc), number in zip(ending, numbers, strict=True):
                values = {**end.change.values(), "status": end.to.value, **number}
                done = await self._deps.update_one(
                    {"id": end.dep_id, "status": doc["status"]}, {"$set": values}, session=session
                )
                if not done.matched_count:
                    raise Conflict
                ended[end.dep_id] = Deployment.from_doc({**doc, **values})
                out.update(_keys(doc["template"], doc.get("client")))
            for n in set(out.values()):
                keys = [k for k, v in out.items() if v == n]
                await self._counters.update_many(
                    {"_id": {"$in": keys}}, {"$inc": {"n": -n}}, session=session
                )
            return [ended[a.dep_id] if isinstance(a, _End) else a for a in answers]

        return await in_transaction(self._client, body)

    @_translated
    async def update(
        self, dep_id: str, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        if FENCE.get() is not None:

            async def fenced(session: AsyncClientSession, attempt: int) -> Deployment | None:
                await self._fence(session)
                return await self._update(dep_id, change, known, session)

            return await in_transaction(self._client, fenced)
        return await self._update(dep_id, change, known, None)

    async def _update(
        self,
        dep_id: str,
        change: Change,
        known: Deployment | None,
        session: AsyncClientSession | None,
    ) -> Deployment | None:
        done = await self._deps.update_one(
            {"id": dep_id}, {"$set": change.values()}, session=session
        )
        if done.matched_count and known is not None and known.id == dep_id:
            return known.evolve(**change.values())
        doc = await self._deps.find_one({"id": dep_id}, {"_id": 0}, session=session)
        return Deployment.from_doc(doc) if doc else None

    @_translated
    async def find(
        self,
        *,
        template: str | None = None,
        statuses: Iterable[Status] | None = None,
        pooled: bool | None = False,
        limit: int = 0,
    ) -> list[Deployment]:
        if statuses is not None:
            # by status alone, the rest filtered here: the embedded database scans every
            # record for a status and a template together (measured: 100,000 examined for
            # none found), while a status alone is read from its index
            query = {"status": {"$in": [s.value for s in statuses]}}
            found = [
                Deployment.from_doc(doc)
                async for doc in self._deps.find(query, {"_id": 0})
                if template in (None, doc["template"]) and pooled in (None, doc.get("pooled"))
            ]
            found.sort(key=lambda d: d.created)
            return found[:limit] if limit else found
        match: dict[str, Any] = {}
        if template is not None:
            match["template"] = template
        if pooled is not None:
            match["pooled"] = pooled
        cursor = self._deps.find(match, {"_id": 0}).sort("created", ASCENDING).limit(limit)
        return [Deployment.from_doc(doc) async for doc in cursor]

    @_translated
    async def active(
        self, *, template: str | None = None, status: Status | None = None
    ) -> list[Deployment]:
        statuses = list(ACTIVE) if status is None else [status]
        return await self.find(template=template, statuses=statuses)

    @_translated
    async def ended(self, *, template: str | None, numbers: list[int]) -> list[Deployment]:
        return await self._history.by_numbers(template=template, numbers=numbers)

    @_translated
    async def ended_range(self, template: str | None) -> tuple[int, int]:
        return await self._history.range(template)

    @_translated
    async def remove_ended(self, before: datetime) -> int:
        removed = 0
        while True:
            docs, retained = await self._history.oldest(before)

            async def body(
                session: AsyncClientSession,
                attempt: int,
                docs: list[dict[str, Any]] = docs,
                retained: int = retained,
            ) -> int:
                await self._fence(session)
                ids = [d["id"] for d in docs]
                done = await self._deps.delete_many({"id": {"$in": ids}}, session=session)
                await self._history.removed(session, docs, retained)
                return done.deleted_count

            removed += await in_transaction(self._client, body)
            if not docs:
                return removed

    @_translated
    async def search(self, query: Search) -> tuple[list[Deployment], int]:
        newest = query.sort == "created" and query.descending and not query.text
        if newest and not (query.offset and query.status is not None and query.status.final):
            return await self._newest(query)
        return await self._scan(query)

    async def _newest(self, query: Search) -> tuple[list[Deployment], int]:
        """The newest records, the active ones first: what the console shows first, read at
        the cost of a page however long the history."""
        active: list[Deployment] = []
        if query.status is None or not query.status.final:
            statuses = list(ACTIVE) if query.status is None else [query.status]
            found = await self.find(template=query.template, statuses=statuses)
            active = sorted(found, key=_newest_first)
        rows = active[query.offset : query.offset + query.limit]
        total = len(active)
        if query.status is None or query.status.final:
            room = query.limit - len(rows)
            skip = max(0, query.offset - len(active))
            if room > 0:
                rows += await self._history.fill(
                    template=query.template, status=query.status, room=room, skip=skip
                )
            if query.status is None:
                total += await self._history.ended_total(query.template)
            elif query.template is None:
                total += (await self._history.status_counts())[query.status.value]
            else:
                total += len(rows)
        return rows, total

    async def _scan(self, query: Search) -> tuple[list[Deployment], int]:
        """Any other order or filter: a query over every record (on the embedded database,
        seconds over months of history)."""
        match: dict[str, Any] = {"pooled": False}
        if query.status is not None:
            match["status"] = query.status.value
        if query.template is not None:
            match["template"] = query.template
        if query.text:
            text = re.escape(query.text)
            match["$or"] = [
                {"id": {"$regex": text}},
                {"reason": {"$regex": text, "$options": "i"}},
            ]
        direction = DESCENDING if query.descending else ASCENDING
        order = [(name, direction) for name in SORT_FIELDS[query.sort]]
        total = await self._deps.count_documents(match)
        found = self._deps.find(match, {"_id": 0}).sort(order).skip(query.offset)
        rows = [Deployment.from_doc(d) async for d in found.limit(query.limit)]
        return rows, total

    @_translated
    async def status_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in ACTIVE}
        for dep in await self.find(statuses=ACTIVE):
            counts[dep.status.value] += 1
        return {**counts, **await self._history.status_counts()}

    @_translated
    async def claim(
        self,
        dep_id: str,
        *,
        created: datetime,
        cull_timeout_ms: int,
        client: str | None,
        urlpath: str = "",
        client_limit: int | None = None,
    ) -> bool | Refusal:
        claim = {
            "created": created,
            "cull_timeout_ms": cull_timeout_ms,
            "client": client,
            "urlpath": urlpath,
        }
        ready = {"id": dep_id, "pooled": True, "status": Status.DEPLOYED.value}

        async def body(session: AsyncClientSession, attempt: int) -> bool | Refusal:
            await self._fence(session)
            done = await self._deps.update_one(
                ready, {"$set": {**claim, "pooled": False}}, session=session
            )
            if not done.modified_count:
                # lost, or won by an earlier try of this very write whose answer was lost
                won = {"id": dep_id, "pooled": False, **claim}
                return await self._deps.find_one(won, {"_id": 1}, session=session) is not None
            if client is None:
                return True
            key = f"client:{client}"
            guard: dict[str, Any] = {"_id": key}
            if client_limit is not None:
                guard["n"] = {"$lt": client_limit}
            try:
                await self._counters.update_one(
                    guard, {"$inc": {"n": 1}}, upsert=True, session=session
                )
            except DuplicateKeyError as exc:  # the counter is there and full
                raise Abort(Refusal.CLIENT) from exc
            return True

        return await in_transaction(self._client, body)

    @_translated
    async def progress(self, dep_id: str, message: str) -> None:
        await self._told.submit({"id": dep_id, "message": message, "at": now(), "by": self._me})

    async def _tell(self, messages: list[dict[str, Any]]) -> list[None]:
        await self._progress.insert_many(messages)  # in order: a launch's messages keep theirs
        return [None] * len(messages)

    async def events(self) -> AsyncIterator[Event]:
        token: Any = None
        pipeline = [
            {
                "$match": {
                    "operationType": {"$in": ["insert", "update", "replace", "delete"]},
                    # not the counters', windows', leases' or heartbeats' writes: each of those
                    # would cost the database a lookup and this server a decode, for nothing
                    "ns.coll": {"$in": list(FOLLOWED)},
                    # nor this server's own progress, which it told its watchers at once: a
                    # burst's messages were most of the events the stream brought back
                    "$or": [
                        {"ns.coll": {"$ne": "progress"}},
                        {"fullDocument.by": {"$ne": self._me}},
                    ],
                }
            },
        ]
        while True:
            try:
                async with await self._db.watch(
                    pipeline,
                    full_document="updateLookup",
                    resume_after=token,
                    max_await_time_ms=int(AWAIT_SECONDS * 1000),
                ) as stream:
                    while stream.alive:
                        asked = time.monotonic()
                        change = await stream.try_next()
                        if change is None:
                            if time.monotonic() - asked < AWAIT_SECONDS / 2:
                                await asyncio.sleep(EMPTY_PAUSE_SECONDS)
                            continue
                        token = stream.resume_token
                        event = _event(change)
                        if event is not None:
                            yield event
            except OperationFailure as exc:
                if exc.code in HISTORY_LOST:
                    logger.warning("change stream lost its place; following from now on")
                    token = None
                    yield Event()  # the followers forget what they hold
                else:
                    logger.warning("change stream interrupted: {}", exc)
            except PyMongoError as exc:
                logger.warning("change stream interrupted: {}", exc.__class__.__name__)
            await asyncio.sleep(0.5)

    # --- templates ------------------------------------------------------------------------------

    @_translated
    async def put_template(self, template: Template, *, seeded: Template | None = None) -> None:
        fields: dict[str, Any] = {"name": template.name, "spec": template.to_api()}
        if seeded is not None:
            fields["seeded"] = seeded.to_api()
        await self._templates.update_one({"name": template.name}, {"$set": fields}, upsert=True)

    @_translated
    async def list_templates(self) -> list[Template]:
        return [parse_template(d["spec"]) async for d in self._templates.find().sort("name", 1)]

    @_translated
    async def seeded_templates(self) -> dict[str, Template]:
        return {
            d["name"]: parse_template(d["seeded"])
            async for d in self._templates.find()
            if d.get("seeded") is not None
        }

    @_translated
    async def delete_template(self, name: str) -> bool:
        # run twice (see _translated), the second run finds none: the template is gone either way
        result = await self._templates.delete_one({"name": name})
        return result.deleted_count > 0

    # --- leases and heartbeats --------------------------------------------------------------------

    @_translated
    async def hold(self, name: str, holder: str, *, seconds: float) -> Fence | None:
        at = _ms()
        until = at + int(seconds * 1000)
        doc = await self._leases.find_one_and_update(
            {"_id": name, "holder": holder, "until": {"$gt": at}},
            {"$set": {"until": until}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            try:
                doc = await self._leases.find_one_and_update(
                    {"_id": name, "until": {"$lte": at}},
                    {"$set": {"holder": holder, "until": until}, "$inc": {"epoch": 1}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                return None  # held by another, and not expired
        return Fence(name=name, holder=holder, epoch=int(doc["epoch"])) if doc else None

    @_translated
    async def release(self, fence: Fence) -> None:
        held = {"_id": fence.name, "holder": fence.holder, "epoch": fence.epoch}
        await self._leases.update_one(held, {"$set": {"until": 0}})

    @_translated
    async def beat(self, server: str) -> None:
        await self._servers.update_one({"_id": server}, {"$set": {"at": _ms()}}, upsert=True)

    @_translated
    async def alive(self, *, within: float) -> set[str]:
        since = _ms() - int(within * 1000)
        return {str(d["_id"]) async for d in self._servers.find({"at": {"$gt": since}})}

    # --- console sessions -------------------------------------------------------------------------

    @_translated
    async def put_session(self, digest: str, expires: datetime) -> None:
        await self._sessions.insert_one({"_id": digest, "expires": expires})

    @_translated
    async def session_valid(self, digest: str) -> bool:
        found = await self._sessions.find_one({"_id": digest, "expires": {"$gt": now()}})
        return found is not None

    @_translated
    async def end_session(self, digest: str) -> None:
        await self._sessions.delete_one({"_id": digest})


def _event(change: dict[str, Any]) -> Event | None:
    collection = change.get("ns", {}).get("coll")
    if collection == "templates":
        return Event(templates=True)
    doc = change.get("fullDocument")
    if doc is None or collection not in ("deployments", "progress"):
        return None
    if collection == "progress":
        return Event(progress=(str(doc.get("id")), str(doc.get("message"))))
    doc.pop("_id", None)
    try:
        return Event(dep=Deployment.from_doc(doc))
    except (KeyError, ValueError, TypeError):
        return None  # not a record this version can read
