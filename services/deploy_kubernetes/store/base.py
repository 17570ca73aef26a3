"""The store port: where deployment records and templates live, and the shape of a change to a
record. Implemented by :class:`~services.deploy_kubernetes.store.mongo.MongoStore` and the tests'
fake; ``tests/integration/test_store_contract.py`` runs the same cases on both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from services.deploy_kubernetes.models import Deployment, Status, Template

ACTIVE = (Status.DEPLOYING, Status.DEPLOYED)
ENDED = (Status.FAILED, Status.DELETED)


class Refusal(StrEnum):
    """Which count refused an admission."""

    TOTAL = "total"
    TEMPLATE = "template"
    CLIENT = "client"


@dataclass(frozen=True)
class Admission:
    """A new record and the limits it must fit in. Every record counts towards the total and
    its template's count; one with a ``client`` (a launch's, not a pooled instance's) towards
    that client's count too. A limit of None checks nothing (the count is kept all the same)."""

    dep: Deployment
    max_total: int
    template_limit: int | None = None
    client_limit: int | None = None


@dataclass(frozen=True)
class Counts:
    """The active deployments (deploying or deployed, pooled ones too) as the store counts
    them: in total, per template and per client (pooled instances have none)."""

    total: int = 0
    templates: dict[str, int] = field(default_factory=dict)
    clients: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Fence:
    """The lease ``name`` as ``holder`` holds it, in its ``epoch``. A write made while a fence
    is set (:data:`FENCE`) lands only while the lease is still so held and not expired by the
    writer's clock; otherwise it raises ``FencedError`` and changes nothing."""

    name: str
    holder: str
    epoch: int


FENCE: ContextVar[Fence | None] = ContextVar("binder_fence", default=None)
"""The fence of the task writing: set by the leader for its loops' writes (a task started from
them inherits it; launch tasks are started without it)."""


@dataclass(frozen=True)
class Event:
    """What a change stream tells: a record as written (``dep``), a launch's progress, or that
    the templates changed; none of them: the stream lost its place (what is held may be stale)."""

    dep: Deployment | None = None
    progress: tuple[str, str] | None = None
    """(deployment id, message)."""
    templates: bool = False


SEARCH_SORTS = ("created", "status", "template", "last-activity", "id")


@dataclass(frozen=True)
class Search:
    """The operators' query of records handed to users: filters, order and window."""

    status: Status | None = None
    template: str | None = None
    text: str = ""
    """Part of an id or of a reason (any case)."""
    sort: str = "created"
    """One of :data:`SEARCH_SORTS`."""
    descending: bool = True
    offset: int = 0
    limit: int = 50


@dataclass(frozen=True)
class Page:
    """One page of a list of records, and the cursor of the next (None: the last page)."""

    deployments: list[Deployment]
    next_cursor: str | None


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
    owner: str | None = None

    def values(self) -> dict[str, Any]:
        """The fields to set, by their record names."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None}


class Store(Protocol):
    """Where deployments and templates live (see the module's docstring)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def insert(self, dep: Deployment) -> None:
        """Add a new record; ``ConflictError`` if its id exists. It counts as :meth:`admit`
        counts, with no limit checked."""

    async def admit(self, admission: Admission) -> Refusal | None:
        """Count the new record in and insert it, in one step, if every count is under its
        limit; the refusal otherwise (nothing written)."""

    async def counts(self) -> Counts: ...

    async def get(self, dep_id: str) -> Deployment | None: ...
    async def move(
        self, dep_id: str, to: Status, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        """Compare-and-set: move to ``to`` from a status allowed to reach it, setting ``change``;
        a move to a final status counts the record out in the same step.

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
    async def active(
        self, *, template: str | None = None, status: Status | None = None
    ) -> list[Deployment]:
        """The active records handed to users (of ``template``, in ``status``)."""

    async def ended(self, *, template: str | None, numbers: list[int]) -> list[Deployment]:
        """The ended records with these numbers (the template's numbers when ``template``)."""

    async def ended_range(self, template: str | None) -> tuple[int, int]:
        """The numbers that ended records may have (of ``template``): (lowest kept, last)."""

    async def remove_ended(self, before: datetime) -> int:
        """Remove the records that ended before ``before``; how many."""

    async def search(self, query: Search) -> tuple[list[Deployment], int]:
        """The window of records ``query`` asks for, and how many match in all."""

    async def status_counts(self) -> dict[str, int]:
        """How many records (pooled ones apart) are in each status."""

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
        """Hand pooled instance ``dep_id`` to a user if it is still pooled and ``deployed``,
        atomically: it stops being pooled and takes the launch's ``created``, cull timeout,
        client and ``urlpath``, and counts towards the client (``Refusal.CLIENT`` when the
        client is at ``client_limit``: nothing written). True when this claim got it (a retried
        write of it that landed counts); False when it is missing, not ready, or another claim
        or a delete was first."""

    async def progress(self, dep_id: str, message: str) -> None:
        """Tell the other servers' watchers of a launch's progress (not kept). This store's own
        :meth:`events` does not bring it back: its caller tells its own watchers at once."""

    def events(self) -> AsyncIterator[Event]:
        """Every record as it is written, by any server, and every progress message of the
        other servers (those of other stores), from now on, for ever; resumed where it left
        off when the database comes back."""

    async def put_template(self, template: Template, *, seeded: Template | None = None) -> None:
        """Register ``template``. ``seeded`` (given when a template file seeds it at start) is
        kept beside it until the next seeding: the file's version it was made from, by which
        the next start tells what the operator changed through the API since."""

    async def list_templates(self) -> list[Template]: ...
    async def seeded_templates(self) -> dict[str, Template]:
        """The ``seeded`` version kept with each registered template that has one, by name."""

    async def delete_template(self, name: str) -> bool: ...


class Leases(Protocol):
    """Leases with a fencing epoch, and the heartbeats of the servers."""

    async def hold(self, name: str, holder: str, *, seconds: float) -> Fence | None:
        """Take lease ``name`` (free or expired: a new epoch) or renew it (held by ``holder``:
        the same epoch), for ``seconds``; None when another holds it."""

    async def release(self, fence: Fence) -> None: ...
    async def beat(self, server: str) -> None:
        """Say that ``server`` is alive now."""

    async def alive(self, *, within: float) -> set[str]:
        """The servers that said they were alive within the last ``within`` seconds."""


class Sessions(Protocol):
    """Console sessions, by the hash of their token, with their expiry."""

    async def put_session(self, digest: str, expires: datetime) -> None: ...
    async def session_valid(self, digest: str) -> bool: ...
    async def end_session(self, digest: str) -> None: ...


class Windows(Protocol):
    """A moving window of events per key, shared by every server."""

    async def hit(self, key: str) -> float:
        """Count an event of ``key`` and return 0; or, when its window is full, count nothing
        and return the seconds until it has room."""


class Database(Store, Leases, Sessions, Protocol):
    """The store, the leases and the sessions of one database (what the server is built on)."""
