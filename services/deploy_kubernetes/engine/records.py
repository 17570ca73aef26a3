"""The one owner of deployment state in this server: the store and the in-memory view together.

No other module reads or writes deployment records except through :class:`Records`. The records
in the database are the only truth shared by the servers; the view is this server's copy of the
ones it has seen, kept up to date by the store's change stream (:meth:`Records.follow`), which
brings every server's writes (this one's too) and every launch's progress, so a watcher on any
server sees a launch that runs on another. A write of this server is shown as soon as the
database acknowledged it (a status read after it sees it), then told to watchers; a copy older
than what is shown never replaces it.

Capacity (total and per template) and each client's deployments are counted by the store, in the
transaction that inserts a record and in the one that ends it (:meth:`Records.admit`), so the
limits are exact across servers and no crash leaves a count wrong.

The ready pooled instances are kept here too, per template, oldest first (every server's, as the
change stream tells of them): a launch picks one from memory (no other local launch can pick it
after) and claims it with one guarded write that tells whether it got it (in one transaction
with its client's count).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

from loguru import logger

from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.errors import (
    CapacityError,
    ConflictError,
    MalformedRequestError,
    NoRecordError,
    RateLimitedError,
)
from services.deploy_kubernetes.models import Deployment, Status
from services.deploy_kubernetes.store.base import (
    ACTIVE,
    Admission,
    Change,
    Counts,
    Event,
    Page,
    Refusal,
    Store,
)

CACHE_SIZE = 20_000
HISTORY_KEPT = 40_000
"""Ended records kept by number (two entries each: the suite's number and the template's)."""
PROGRESS_KEPT = 20
"""Progress messages kept per launch under way, for a watcher who comes in the middle."""
RETRY_AFTER = {"Retry-After": "30"}


def _stage(status: Status) -> int:
    """How far along its life a status is; a record is never shown going back."""
    return 2 if status.final else (1 if status is Status.DEPLOYED else 0)


@dataclass(frozen=True)
class Progress:
    """A backend's word on a launch under way (a pod pulling its image), for event streams."""

    id: str
    message: str


Update = Deployment | Progress


@dataclass(frozen=True)
class Claim:
    """What a launch sets on the pooled instance it takes."""

    created: datetime
    cull_timeout_ms: int
    client: str | None
    urlpath: str = ""


class Records:
    def __init__(
        self,
        *,
        store: Store,
        metrics: Metrics,
        max_deployments: int,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self.max_deployments = max_deployments
        self._view: OrderedDict[str, Deployment] = OrderedDict()
        self._active: dict[str, str] = {}
        """Active (deploying or deployed, pooled too) deployment ids of every server, as this
        server last saw them (its writes and the change stream), and their templates."""
        self._listeners: list[Callable[[Deployment], None]] = []
        """Told of every record this server sees change (the host's route keeper)."""
        self._known_total = 0
        """The active deployments of every server as last counted, plus this server's
        admissions since: a hint only, of whether a launch will likely be admitted."""
        self._admitting = 0
        self._held: dict[str, list[str]] = {}
        """Progress of launches whose records are being admitted, told once they are."""
        self._history: OrderedDict[tuple[str, int], Deployment] = OrderedDict()
        """Ended records by (template or "", number): they never change."""
        self._watchers: dict[str, set[asyncio.Queue[Update]]] = {}
        self._progress: dict[str, deque[Progress]] = {}
        self._ready: dict[str, OrderedDict[str, Deployment]] = {}
        """Ready (pooled, deployed) instances a launch may claim, per template, oldest first."""
        self._claiming: set[str] = set()
        """Pooled instances whose claim is being written."""
        self._withdrawn: set[str] = set()
        """Pooled instances being retired: never claimable again."""

    async def open(self) -> list[Deployment]:
        """Connect, and read what is active; returns the active records."""
        await self._store.open()
        live = await self._store.find(statuses=ACTIVE, pooled=None)
        self._active = {d.id: d.template for d in live}
        for dep in live:
            self._remember(dep)
        self._known_total = len(live)
        return live

    def listen(self, listener: Callable[[Deployment], None]) -> None:
        """Tell ``listener`` of every record this server sees change, from now on."""
        self._listeners.append(listener)

    def apply(self, event: Event) -> None:
        """Apply a write of any server or another server's progress message, as the store's
        change stream tells it (:meth:`Deployer.follow`)."""
        if event.dep is not None:
            self._remember(event.dep)
        elif event.progress is not None:
            self._told(*event.progress)
        elif not event.templates:  # the stream could not resume: what is held may be stale
            self._view.clear()
            self._active.clear()

    async def ping(self) -> None:
        await self._store.ping()

    async def close(self) -> None:
        await self._store.close()

    # --- the view -----------------------------------------------------------------------------

    def _remember(self, dep: Deployment) -> None:
        old = self._view.get(dep.id)
        if old is not None and _stage(dep.status) < _stage(old.status):
            return  # a copy older than what is shown (a write answered after a later one)
        if old == dep:  # this server's own write, back from the change stream
            self._view.move_to_end(dep.id)
            return
        self._view[dep.id] = dep
        self._view.move_to_end(dep.id)
        while len(self._view) > CACHE_SIZE:
            self._view.popitem(last=False)
        if dep.status is not Status.DEPLOYING:
            self._progress.pop(dep.id, None)
        if dep.status.final:
            self._active.pop(dep.id, None)
        else:
            self._active[dep.id] = dep.template
        if dep.ended_seq is not None:
            self._keep_ended(dep)
        self._note_pooled(dep)
        for queue in self._watchers.get(dep.id, ()):
            queue.put_nowait(dep)
        for listener in self._listeners:
            listener(dep)

    async def get(self, dep_id: str) -> Deployment | None:
        dep = self._view.get(dep_id)
        if dep is None:
            dep = await self._store.get(dep_id)
            if dep is not None:
                self._remember(dep)
        return dep

    def cached(self, dep_id: str) -> Deployment | None:
        return self._view.get(dep_id)

    def active(self) -> list[Deployment]:
        """The active deployments (deploying or deployed, pooled too) of every server, as this
        server last saw them, without a database read."""
        return [dep for dep_id in self._active if (dep := self._view.get(dep_id)) is not None]

    async def find(
        self,
        *,
        template: str | None = None,
        statuses: Iterable[Status] | None = None,
        pooled: bool | None = False,
        limit: int = 0,
    ) -> list[Deployment]:
        return await self._store.find(
            template=template, statuses=statuses, pooled=pooled, limit=limit
        )

    async def page(
        self,
        *,
        template: str | None = None,
        status: Status | None = None,
        limit: int,
        cursor: str | None = None,
    ) -> Page:
        """The active records and the newest ended ones, at most ``limit``, oldest first; an
        older page of ended ones from ``cursor``. Ended records never change: those of the
        page that this server has seen (it sees every record end) are not read again."""
        active: list[Deployment] = []
        if cursor is None and (status is None or not status.final):
            found = await self._store.active(template=template, status=status)
            active = sorted(found, key=lambda d: d.created, reverse=True)[:limit]
        room = limit - len(active)
        ended: list[Deployment] = []
        following = None
        if room > 0 and (status is None or status.final):
            low, last = await self._store.ended_range(template)
            start = last if cursor is None else min(last, _number(cursor))
            end = max(low, start - room + 1)
            numbers = list(range(start, end - 1, -1))
            ended = await self._ended(template, numbers)
            if status is not None:
                ended = [d for d in ended if d.status is status]
            following = f"e{end - 1}" if end - 1 >= low else None
        return Page(sorted([*active, *ended], key=lambda d: (d.created, d.id)), following)

    async def _ended(self, template: str | None, numbers: list[int]) -> list[Deployment]:
        scope = template or ""
        known = {n: self._history.get((scope, n)) for n in numbers}
        missing = [n for n, dep in known.items() if dep is None]
        if missing:
            for dep in await self._store.ended(template=template, numbers=missing):
                self._keep_ended(dep)
                known[_number_in(dep, template)] = dep
        return [dep for dep in known.values() if dep is not None and not dep.pooled]

    def _keep_ended(self, dep: Deployment) -> None:
        """Keep an ended record by its numbers (the suite's and its template's)."""
        for key in (("", dep.ended_seq), (dep.template, dep.template_number)):
            if key[1] is not None:
                self._history[(key[0], key[1])] = dep
                self._history.move_to_end((key[0], key[1]))
        while len(self._history) > HISTORY_KEPT:
            self._history.popitem(last=False)

    async def remove_ended(self, before: datetime) -> int:
        return await self._store.remove_ended(before)

    async def counts(self) -> Counts:
        """The active deployments of every server, counted; refreshes the admission hint."""
        counts = await self._store.counts()
        self._known_total = counts.total
        return counts

    # --- writes -------------------------------------------------------------------------------

    def likely_admitted(self) -> bool:
        """Whether a launch will likely be admitted (a hint: far enough from the total)."""
        return self._known_total + self._admitting < self.max_deployments - 1

    async def admit(
        self,
        dep: Deployment,
        *,
        template_limit: int | None = None,
        client_limit: int | None = None,
    ) -> None:
        """Count ``dep`` in and write it, in one step, within the total, its template's
        ``template_limit`` and its client's ``client_limit`` (``CapacityError`` or
        ``RateLimitedError``, nothing written, when one is reached)."""
        admission = Admission(
            dep=dep,
            max_total=self.max_deployments,
            template_limit=template_limit,
            client_limit=client_limit,
        )
        self._admitting += 1
        self._held[dep.id] = []  # progress told while the record is written (see progress)
        try:
            refusal = await self._admit(admission)
        finally:
            self._admitting -= 1
            held = self._held.pop(dep.id, [])
        if refusal is None:
            self._known_total += 1
            self._remember(dep)
            for message in held:
                await self.progress(dep.id, message)
            return
        self._metrics.errors.labels(type="capacity").inc()
        if refusal is Refusal.CLIENT:
            raise client_refused(client_limit)
        self._known_total = self.max_deployments
        if refusal is Refusal.TEMPLATE:
            raise CapacityError(
                f"template {dep.template} runs its maximum of {template_limit} deployments; "
                "retry later",
                headers=RETRY_AFTER,
            )
        raise CapacityError(
            f"the server runs its maximum of {self.max_deployments} deployments; retry later",
            headers=RETRY_AFTER,
        )

    async def _admit(self, admission: Admission) -> Refusal | None:
        """Admit; a duplicate of its own fresh id is its own write that landed before a retry,
        which is a success."""
        try:
            return await self._store.admit(admission)
        except ConflictError:
            if await self._store.get(admission.dep.id) != admission.dep:
                raise
            return None

    async def move(self, dep: Deployment, to: Status, change: Change) -> Deployment | None:
        """Write ``dep``'s move to ``to`` (if still allowed) before anything acts on it.

        None when the record has moved elsewhere meanwhile (a launch deleted while it ran)."""
        known = self._view.get(dep.id)
        moved = await self._store.move(dep.id, to, change, known=known)
        latest = self._view.get(dep.id)
        if moved is not None and latest is not None and latest is not known:
            # another write of this record was answered first: go on from it, never back
            if _stage(latest.status) > _stage(to):
                return None
            moved = latest.evolve(status=to, **change.values())
        if moved is None or moved.status is not to:
            current = moved or await self._store.get(dep.id)
            if current is not None:
                self._remember(current)
            return None
        self._remember(moved)
        if to.final:
            self._known_total = max(0, self._known_total - 1)
        self._metrics.transitions.labels(status=to.value).inc()
        log = logger.bind(id=dep.id, template=dep.template)
        if to is Status.FAILED:
            log.warning("failed: {}", change.reason)
        else:
            log.info("{}{}", to.value, f": {change.reason}" if change.reason else "")
        return moved

    async def update(self, dep_id: str, change: Change) -> Deployment | None:
        known = self._view.get(dep_id)
        dep = await self._store.update(dep_id, change, known=known)
        latest = self._view.get(dep_id)
        if dep is not None and latest is not None and latest is not known:
            # moved or updated while this was written: the change goes onto what is shown now
            dep = latest.evolve(**change.values())
        if dep is not None:
            self._remember(dep)
        return dep

    # --- the pools ----------------------------------------------------------------------------

    def _note_pooled(self, dep: Deployment) -> None:
        ready = self._ready.setdefault(dep.template, OrderedDict())
        claimable = dep.pooled and dep.status is Status.DEPLOYED
        if claimable and dep.id not in self._withdrawn and dep.id not in self._claiming:
            ready[dep.id] = dep  # a known one keeps its place
        else:
            ready.pop(dep.id, None)
        if dep.status.final:
            self._withdrawn.discard(dep.id)

    async def claim_pooled(
        self, template: str, claim: Claim, *, client_limit: int | None = None
    ) -> Deployment | None:
        """Hand the oldest ready pooled instance of ``template`` to a user, durably, in one
        step with its client's count (``RateLimitedError`` at ``client_limit``); None when none
        is ready."""
        ready = self._ready.get(template)
        while ready:
            _, dep = ready.popitem(last=False)  # no other launch of this process picks it now
            if await self._claim(dep, claim, client_limit):
                claimed = self._view.get(dep.id, dep).evolve(pooled=False, **asdict(claim))
                self._remember(claimed)
                return claimed
            current = await self._store.get(dep.id)  # another server's claim, or a delete
            if current is not None:
                self._remember(current)
        return None

    async def _claim(self, dep: Deployment, claim: Claim, client_limit: int | None) -> bool:
        """Write ``claim`` of ``dep``; True when it is the launch's (and ``dep`` has not ended
        meanwhile, its app gone: then the launch takes the next one)."""
        self._claiming.add(dep.id)
        try:
            won = await self._store.claim(
                dep.id,
                created=claim.created,
                cull_timeout_ms=claim.cull_timeout_ms,
                client=claim.client,
                urlpath=claim.urlpath,
                client_limit=client_limit,
            )
            if won is Refusal.CLIENT:
                raise client_refused(client_limit)
        except BaseException:  # not known to have landed: the guard stops a second claim
            self._claiming.discard(dep.id)
            if self._view.get(dep.id, dep) == dep:
                self._note_pooled(dep)
                if dep.id in (ready := self._ready[dep.template]):
                    ready.move_to_end(dep.id, last=False)  # first again
            raise
        self._claiming.discard(dep.id)
        return won is True and not self._view.get(dep.id, dep).status.final

    def withdraw(self, dep: Deployment) -> bool:
        """Take pooled ``dep`` out of what launches may claim, before it is retired; False when
        a launch has claimed it (or is claiming it) already."""
        current = self._view.get(dep.id, dep)
        if not current.pooled or current.status.final or dep.id in self._claiming:
            return False
        self._withdrawn.add(dep.id)
        self._ready.get(dep.template, OrderedDict()).pop(dep.id, None)
        return True

    # --- watchers -----------------------------------------------------------------------------

    async def progress(self, dep_id: str, message: str) -> None:
        """Tell the id's watchers what the backend reports of its launch (while it deploys):
        this server's at once, every other server's through the store (their change streams
        bring it to them; this server's leaves its own out)."""
        dep = self._view.get(dep_id)
        if dep is None and dep_id in self._held:  # its object was made while it is written
            self._held[dep_id].append(message)  # (a pod's Scheduled comes within milliseconds)
        elif dep is not None and dep.status is Status.DEPLOYING:
            self._told(dep_id, message)
            await self._store.progress(dep_id, message)

    def _told(self, dep_id: str, message: str) -> None:
        """A launch's progress, this server's or another's (from the change stream): to this
        server's watchers of it; the last few are kept for watchers who come later."""
        dep = self._view.get(dep_id)
        if dep is None or dep.status is not Status.DEPLOYING:
            return
        update = Progress(dep_id, message)
        self._progress.setdefault(dep_id, deque(maxlen=PROGRESS_KEPT)).append(update)
        for queue in self._watchers.get(dep_id, ()):
            queue.put_nowait(update)

    async def watch(
        self, dep_id: str, *, idle_seconds: float | None = None
    ) -> AsyncGenerator[Update | None, None]:
        """The deployment now, then each change (and progress), until a final status; ``None``
        after each ``idle_seconds`` without news (a stream's keep-alive), so that one task can
        consume it alone: an async generator must never be iterated by two tasks."""
        dep = await self.get(dep_id)
        if dep is None:
            raise NoRecordError(f"no deployment {dep_id}")
        queue: asyncio.Queue[Update] = asyncio.Queue()
        self._watchers.setdefault(dep_id, set()).add(queue)
        try:
            update: Update = self._view.get(dep_id, dep)
            yield update
            for told in list(self._progress.get(dep_id, ())):
                yield told
            while not (isinstance(update, Deployment) and update.status.final):
                try:
                    update = await asyncio.wait_for(queue.get(), idle_seconds)
                except TimeoutError:
                    yield None
                    continue
                yield update
        finally:
            watchers = self._watchers.get(dep_id, set())
            watchers.discard(queue)
            if not watchers:
                self._watchers.pop(dep_id, None)


def client_refused(limit: int | None) -> RateLimitedError:
    return RateLimitedError(
        f"per_client_max_deployments: this client runs its maximum of {limit} deployments; "
        "delete one or retry later",
        headers={"Retry-After": "60"},
    )


def _number(cursor: str) -> int:
    if not cursor.startswith("e") or not cursor[1:].isdigit() or len(cursor) > 20:
        raise MalformedRequestError("cursor: not a cursor this server gave out")
    return int(cursor[1:])


def _number_in(dep: Deployment, template: str | None) -> int:
    number = dep.ended_seq if template is None else dep.template_number
    assert number is not None
    return number
