"""Deployment and template records in MongoDB (pymongo's async client; the only pymongo user
of the deploy server). Every database failure becomes ``BadDatabaseError``.

Writes are acknowledged only once journaled (``j=True``), and every operation has a deadline
(``timeoutMS``), so a frozen database answers 503 instead of hanging a request.

Every operation here may run twice with the same outcome (a move is guarded by the status it
leaves and read back when it matched nothing, a claim checks whether an earlier try won, an
insert that finds its own record took), so an operation whose connection broke under it (the
database restarted) is run once more here: what the driver's retryable writes would do, without
the server's per-write session bookkeeping, which cost the embedded server a quarter of its CPU
per write (1.9 against 1.4 ms) and the caller half a millisecond.

Compare-and-set moves are an ``update_one`` guarded by the status, rather than one
``find_one_and_update``: the embedded server scans the whole collection for the latter (measured:
31 ms of its CPU per move over 3,200 records, against 1.4 ms for ``update_one`` and ``find_one``).
When the caller knows the record as last written (the one owner of deployment state does), a move
that matched needs no read back: the record is the known one with the change applied. A pooled
claim is one guarded ``update_one`` alone, for the same reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ParamSpec, Protocol, TypeVar

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    NetworkTimeout,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from services.deploy_kubernetes.errors import BadDatabaseError, ConflictError
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    Template,
    parse_template,
    sources_of,
)

P = ParamSpec("P")
R = TypeVar("R")
ACTIVE = (Status.DEPLOYING, Status.DEPLOYED)


@dataclass(frozen=True)
class Change:
    """Fields of a deployment that a status move or an update sets; ``None`` leaves one as it is."""

    location: str | None = None
    url: str | None = None
    reason: str | None = None
    target: str | None = None
    backend_ref: dict[str, Any] | None = None
    deployed_at: datetime | None = None
    ended_at: datetime | None = None
    last_activity: datetime | None = None

    def values(self) -> dict[str, Any]:
        """The fields to set, by their record names."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None}


class Store(Protocol):
    """Where deployments and templates live. Implemented by :class:`MongoStore` and the tests'
    fake; ``tests/integration/test_store_contract.py`` runs the same cases on both."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def insert(self, dep: Deployment) -> None:
        """Add a new record; ``ConflictError`` if its id exists."""

    async def get(self, dep_id: str) -> Deployment | None: ...
    async def move(
        self, dep_id: str, to: Status, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        """Compare-and-set: move to ``to`` from a status allowed to reach it, setting ``change``.

        A record already at ``to`` is returned as it is (a retried write that landed is a
        success); None when the record is missing or final in another status. ``known`` is the
        record as last written, if the caller has it: the result is then built from it."""

    async def update(
        self, dep_id: str, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None: ...
    async def find(
        self,
        *,
        template: str | None = None,
        statuses: Iterable[Status] | None = None,
        pooled: bool | None = False,
        limit: int = 0,
    ) -> list[Deployment]: ...
    async def claim(
        self, dep_id: str, *, created: datetime, cull_timeout_ms: int, client: str | None
    ) -> bool:
        """Hand pooled instance ``dep_id`` to a user if it is still pooled and ``deployed``,
        atomically: it stops being pooled and takes the launch's ``created``, cull timeout and
        client. True when this claim got it (a retried write of it that landed counts); False
        when it is missing, not ready, or another claim or a delete was first."""

    async def put_template(self, template: Template) -> None: ...
    async def get_template(self, name: str) -> Template | None: ...
    async def list_templates(self) -> list[Template]: ...
    async def delete_template(self, name: str) -> bool: ...


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
        except DuplicateKeyError as exc:
            raise ConflictError("a record with that id exists already") from exc
        except PyMongoError as exc:
            raise BadDatabaseError(f"database unreachable: {exc.__class__.__name__}") from exc

    return wrapper


class MongoStore:
    """:class:`Store` on a MongoDB server (or the embedded wire-compatible one)."""

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
        self._deps = db["deployments"]
        self._templates = db["templates"]

    @_translated
    async def open(self) -> None:
        await self._deps.create_index([("id", ASCENDING)], unique=True)
        await self._deps.create_index([("status", ASCENDING), ("template", ASCENDING)])
        await self._deps.create_index([("template", ASCENDING), ("created", DESCENDING)])
        await self._templates.create_index([("name", ASCENDING)], unique=True)

    async def close(self) -> None:
        await self._client.close()

    @_translated
    async def ping(self) -> None:
        await self._client.admin.command("ping")

    @_translated
    async def insert(self, dep: Deployment) -> None:
        await self._deps.insert_one(dep.to_doc())

    @_translated
    async def get(self, dep_id: str) -> Deployment | None:
        doc = await self._deps.find_one({"id": dep_id}, {"_id": 0})
        return Deployment.from_doc(doc) if doc else None

    @_translated
    async def move(
        self, dep_id: str, to: Status, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        sources = [s.value for s in sources_of(to)]
        done = await self._deps.update_one(
            {"id": dep_id, "status": {"$in": sources}},
            {"$set": {**change.values(), "status": to.value}},
        )
        if done.matched_count and known is not None and known.id == dep_id:
            return known.evolve(status=to, **change.values())
        # moved now, or earlier by a retried write that landed: either way it is at `to`
        doc = await self._deps.find_one({"id": dep_id, "status": to.value}, {"_id": 0})
        return Deployment.from_doc(doc) if doc else None

    @_translated
    async def update(
        self, dep_id: str, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        done = await self._deps.update_one({"id": dep_id}, {"$set": change.values()})
        if done.matched_count and known is not None and known.id == dep_id:
            return known.evolve(**change.values())
        doc = await self._deps.find_one({"id": dep_id}, {"_id": 0})
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
        query: dict[str, Any] = {}
        if template is not None:
            query["template"] = template
        if statuses is not None:
            query["status"] = {"$in": [s.value for s in statuses]}
        if pooled is not None:
            query["pooled"] = pooled
        cursor = self._deps.find(query, {"_id": 0}).sort("created", ASCENDING).limit(limit)
        return [Deployment.from_doc(doc) async for doc in cursor]

    @_translated
    async def claim(
        self, dep_id: str, *, created: datetime, cull_timeout_ms: int, client: str | None
    ) -> bool:
        claim = {"created": created, "cull_timeout_ms": cull_timeout_ms, "client": client}
        ready = {"id": dep_id, "pooled": True, "status": Status.DEPLOYED.value}
        done = await self._deps.update_one(ready, {"$set": {**claim, "pooled": False}})
        if done.modified_count:
            return True
        # lost, or won by an earlier try of this very write whose answer was lost
        doc = await self._deps.find_one({"id": dep_id, "pooled": False, **claim}, {"_id": 0})
        return doc is not None

    @_translated
    async def put_template(self, template: Template) -> None:
        await self._templates.replace_one(
            {"name": template.name}, {"name": template.name, "spec": template.to_api()}, upsert=True
        )

    @_translated
    async def get_template(self, name: str) -> Template | None:
        doc = await self._templates.find_one({"name": name})
        return parse_template(doc["spec"]) if doc else None

    @_translated
    async def list_templates(self) -> list[Template]:
        return [parse_template(d["spec"]) async for d in self._templates.find().sort("name", 1)]

    @_translated
    async def delete_template(self, name: str) -> bool:
        # run twice (see _translated), the second run finds none: the template is gone either way
        result = await self._templates.delete_one({"name": name})
        return result.deleted_count > 0
