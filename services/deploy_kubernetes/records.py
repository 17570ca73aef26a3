"""The one owner of deployment state: the store and the in-memory view together.

No other module reads or writes deployment records except through :class:`Records`. A record
enters the view only once the database has acknowledged it; a status move is written first and
only then shown, counted and told to watchers. Capacity is kept here too: the active deployments
(total and per template) are counted in memory, seeded from the records at start, and a launch
reserves its slot in one step with no database round trip in between, so concurrent launches
are not serialised and the limits stay exact.

The ready pooled instances are kept here too, per template, oldest first: a launch picks one
from memory (no other local launch can pick it after) and claims it with one guarded write
that tells whether it got it, so a pooled launch costs one database round trip.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

from loguru import logger

from services.deploy_kubernetes.errors import CapacityError, ConflictError, NoRecordError
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status
from services.deploy_kubernetes.store import ACTIVE, Change, Store

CACHE_SIZE = 20_000
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


class Records:
    def __init__(
        self,
        *,
        store: Store,
        metrics: Metrics,
        max_deployments: int,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._on_end = on_end
        """Told the id of each deployment that reaches a final status (per-client limits)."""
        self._metrics = metrics
        self.max_deployments = max_deployments
        self._view: OrderedDict[str, Deployment] = OrderedDict()
        self._active: dict[str, str] = {}
        """Active (deploying or deployed, pooled too) deployment ids and their templates."""
        self._watchers: dict[str, set[asyncio.Queue[Update]]] = {}
        self._progress: dict[str, deque[Progress]] = {}
        self._ready: dict[str, OrderedDict[str, Deployment]] = {}
        """Ready (pooled, deployed) instances a launch may claim, per template, oldest first."""
        self._claiming: set[str] = set()
        """Pooled instances whose claim is being written."""
        self._withdrawn: set[str] = set()
        """Pooled instances being retired: never claimable again."""

    async def open(self) -> list[Deployment]:
        """Connect, and count what is active; returns the active records (for reconcile)."""
        await self._store.open()
        live = await self._store.find(statuses=ACTIVE, pooled=None)
        self._active = {d.id: d.template for d in live}
        for dep in live:
            self._remember(dep)
        return live

    async def ping(self) -> None:
        await self._store.ping()

    async def close(self) -> None:
        await self._store.close()

    # --- the view -----------------------------------------------------------------------------

    def _remember(self, dep: Deployment) -> None:
        old = self._view.get(dep.id)
        if old is not None and _stage(dep.status) < _stage(old.status):
            return  # a copy older than what is shown (a write answered after a later one)
        self._view[dep.id] = dep
        self._view.move_to_end(dep.id)
        while len(self._view) > CACHE_SIZE:
            self._view.popitem(last=False)
        if dep.status is not Status.DEPLOYING:
            self._progress.pop(dep.id, None)
        self._note_pooled(dep)
        if dep.status.final:
            self._active.pop(dep.id, None)
            if self._on_end is not None:
                self._on_end(dep.id)
        for queue in self._watchers.get(dep.id, ()):
            queue.put_nowait(dep)

    async def get(self, dep_id: str) -> Deployment | None:
        dep = self._view.get(dep_id)
        if dep is None:
            dep = await self._store.get(dep_id)
            if dep is not None:
                self._remember(dep)
        return dep

    def cached(self, dep_id: str) -> Deployment | None:
        return self._view.get(dep_id)

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

    def active_count(self, template: str | None = None) -> int:
        if template is None:
            return len(self._active)
        return sum(1 for t in self._active.values() if t == template)

    # --- writes -------------------------------------------------------------------------------

    def _reserve(self, dep: Deployment, template_limit: int | None) -> None:
        if len(self._active) >= self.max_deployments:
            self._metrics.errors.labels(type="capacity").inc()
            raise CapacityError(
                f"the server runs its maximum of {self.max_deployments} deployments; retry later",
                headers=RETRY_AFTER,
            )
        if template_limit is not None and self.active_count(dep.template) >= template_limit:
            self._metrics.errors.labels(type="capacity").inc()
            raise CapacityError(
                f"template {dep.template} runs its maximum of {template_limit} deployments; "
                "retry later",
                headers=RETRY_AFTER,
            )
        self._active[dep.id] = dep.template

    async def create(self, dep: Deployment, *, template_limit: int | None = None) -> None:
        """Reserve capacity for ``dep`` (``CapacityError`` when full), then write it."""
        self.reserve(dep, template_limit=template_limit)
        await self.write_new(dep)

    def reserve(self, dep: Deployment, *, template_limit: int | None = None) -> None:
        """Count ``dep`` as active (``CapacityError`` when full): :meth:`write_new` writes it."""
        if dep.id in self._active:
            raise ConflictError("a record with that id exists already")
        self._reserve(dep, template_limit)

    async def write_new(self, dep: Deployment) -> None:
        """Write reserved ``dep``; its reservation is released when it cannot be written."""
        try:
            await self._insert(dep)
        except BaseException:
            self._active.pop(dep.id, None)
            raise
        self._remember(dep)

    async def _insert(self, dep: Deployment) -> None:
        """Insert ``dep``; a duplicate of its own fresh id is its own write that landed before a
        retry (the driver retries writes), which is a success."""
        try:
            await self._store.insert(dep)
        except ConflictError:
            if await self._store.get(dep.id) != dep:
                raise

    def has_room(self) -> bool:
        return len(self._active) < self.max_deployments

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
        self, template: str, *, created: datetime, cull_timeout_ms: int, client: str | None
    ) -> Deployment | None:
        """Hand the oldest ready pooled instance of ``template`` to a user, durably, in one
        write; None when none is ready."""
        ready = self._ready.get(template)
        while ready:
            _, dep = ready.popitem(last=False)  # no other launch of this process picks it now
            claim = Claim(created=created, cull_timeout_ms=cull_timeout_ms, client=client)
            if await self._claim(dep, claim):
                claimed = self._view.get(dep.id, dep).evolve(pooled=False, **asdict(claim))
                self._remember(claimed)
                return claimed
            current = await self._store.get(dep.id)  # another server's claim, or a delete
            if current is not None:
                self._remember(current)
        return None

    async def _claim(self, dep: Deployment, claim: Claim) -> bool:
        """Write ``claim`` of ``dep``; True when it is the launch's (and ``dep`` has not ended
        meanwhile, its app gone: then the launch takes the next one)."""
        self._claiming.add(dep.id)
        try:
            won = await self._store.claim(
                dep.id,
                created=claim.created,
                cull_timeout_ms=claim.cull_timeout_ms,
                client=claim.client,
            )
        except BaseException:  # not known to have landed: the guard stops a second claim
            self._claiming.discard(dep.id)
            if self._view.get(dep.id, dep) == dep:
                self._note_pooled(dep)
                if dep.id in (ready := self._ready[dep.template]):
                    ready.move_to_end(dep.id, last=False)  # first again
            raise
        self._claiming.discard(dep.id)
        return won and not self._view.get(dep.id, dep).status.final

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

    def progress(self, dep_id: str, message: str) -> None:
        """Tell the id's watchers what the backend reports of its launch (while it deploys); the
        last few are kept for watchers who come later."""
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
