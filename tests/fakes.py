"""Hand-written fakes of the deploy server's ports, for unit tests of the logic above them.
They record calls and can be told to fail. The contract tests keep them honest."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio

from common.proxy import ProxyRoute
from services.deploy_kubernetes.backends.base import LaunchSpec, Lines, Notify, Observed, State
from services.deploy_kubernetes.errors import (
    BadBackendError,
    BadDatabaseError,
    BadProxyError,
    ConflictError,
    LaunchError,
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
    Admission,
    Change,
    Counts,
    Event,
    Fence,
    Refusal,
    Search,
)

ACTIVE = (Status.DEPLOYING, Status.DEPLOYED)
SORTS: dict[str, Callable[[Deployment], Any]] = {
    "created": lambda d: d.created,
    "status": lambda d: (d.status.value, d.created),
    "template": lambda d: (d.template, d.created),
    "last-activity": lambda d: (d.last_activity or d.created, d.created),
    "id": lambda d: d.id,
}


def _keys(dep: Deployment) -> list[str]:
    keys = ["total", f"template:{dep.template}"]
    return keys if dep.client is None else [*keys, f"client:{dep.client}"]


class FakeStore:
    def __init__(self) -> None:
        self.deps: dict[str, Deployment] = {}
        self.templates: dict[str, Template] = {}
        self.seeds: dict[str, Template] = {}
        self.down = False
        self.paused: asyncio.Event | None = None
        """When set, writes wait for it after landing and before answering (a slow answer)."""
        self.landed = asyncio.Event()
        """Set when a paused write has landed."""
        self.retried_inserts = 0
        """Inserts that land, then answer a duplicate key (a driver's retry of a lost answer)."""
        self.full_reads = 0
        """Reads of every active deployment, pooled or not (what the keeper reads)."""
        self.insert_delay = 0.0
        """Seconds an insert takes before it lands (a slow database)."""
        self.counters: dict[str, int] = {}
        self._events: asyncio.Queue[Event] | None = None
        self.leases: dict[str, tuple[str, int, float]] = {}
        self.beats: dict[str, float] = {}
        self.sessions: dict[str, datetime] = {}
        self._all: list[FakeStore] = [self]
        """The stores of one database: this one and its siblings."""

    def sibling(self) -> FakeStore:
        """Another server's store on the same database (its state shared)."""
        other = FakeStore()
        for name in ("deps", "templates", "seeds", "counters", "leases", "beats", "sessions"):
            setattr(other, name, getattr(self, name))
        other._all = self._all
        self._all.append(other)
        return other

    def _tell(self, dep: Deployment | None = None, progress: tuple[str, str] | None = None) -> None:
        """A record's write reaches every store's events; a progress message the others'."""
        for store in self._all:
            if store._events is not None and (progress is None or store is not self):
                store._events.put_nowait(Event(dep=dep, progress=progress))

    def _count(self, dep: Deployment, by: int) -> None:
        for key in _keys(dep):
            self.counters[key] = self.counters.get(key, 0) + by

    async def _answer(self) -> None:
        if self.paused is not None:
            self.landed.set()
            await self.paused.wait()

    def _check(self) -> None:
        if self.down:
            raise BadDatabaseError("database unreachable: fake outage")

    async def open(self) -> None:
        self._check()

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        self._check()

    async def insert(self, dep: Deployment) -> None:
        refusal = await self.admit(Admission(dep=dep, max_total=2**62))
        assert refusal is None

    async def admit(self, admission: Admission) -> Refusal | None:
        self._check()
        dep = admission.dep
        if self.insert_delay:
            await asyncio.sleep(self.insert_delay)
        if dep.id in self.deps:
            raise ConflictError("a record with that id exists already")
        client = f"client:{dep.client}"
        if admission.client_limit is not None and self.counters.get(client, 0) >= (
            admission.client_limit
        ):
            return Refusal.CLIENT
        if self.counters.get("total", 0) >= admission.max_total:
            return Refusal.TOTAL
        limit = admission.template_limit
        if limit is not None and self.counters.get(f"template:{dep.template}", 0) >= limit:
            return Refusal.TEMPLATE
        self.deps[dep.id] = dep
        self._count(dep, 1)
        self._tell(dep)
        if self.retried_inserts:  # the write landed, its answer was lost, the retry collides
            self.retried_inserts -= 1
            raise ConflictError("a record with that id exists already")
        return None

    async def counts(self) -> Counts:
        self._check()

        def part(prefix: str) -> dict[str, int]:
            return {
                k.removeprefix(prefix): n
                for k, n in self.counters.items()
                if k.startswith(prefix) and n > 0
            }

        return Counts(
            total=self.counters.get("total", 0),
            templates=part("template:"),
            clients=part("client:"),
        )

    async def get(self, dep_id: str) -> Deployment | None:
        self._check()
        return self.deps.get(dep_id)

    async def move(
        self, dep_id: str, to: Status, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        self._check()
        dep = self.deps.get(dep_id)
        if dep is not None and dep.status is to:
            return dep  # a retried move that landed already
        if dep is None or dep.status not in set(sources_of(to)):
            return None
        numbers: dict[str, Any] = {}
        if to.final:
            self._count(dep, -1)
            for key in ("ended", f"ended:{dep.template}"):
                self.counters[key] = self.counters.get(key, 0) + 1
            numbers = {
                "ended_seq": self.counters["ended"],
                "template_seq": f"{dep.template}/{self.counters[f'ended:{dep.template}']:012d}",
            }
        self.deps[dep_id] = replace(dep, status=to, **change.values(), **numbers)
        self._tell(self.deps[dep_id])
        await self._answer()
        if known is not None and not to.final:  # as the real store: built from the known record
            return replace(known, status=to, **change.values())
        return self.deps[dep_id]

    async def update(
        self, dep_id: str, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        self._check()
        if dep_id not in self.deps:
            return None
        self.deps[dep_id] = replace(self.deps[dep_id], **change.values())
        self._tell(self.deps[dep_id])
        await self._answer()
        if known is not None:  # as the real store: built from the known record
            return replace(known, **change.values())
        return self.deps[dep_id]

    async def find(
        self,
        *,
        template: str | None = None,
        statuses: Iterable[Status] | None = None,
        pooled: bool | None = False,
        limit: int = 0,
    ) -> list[Deployment]:
        self._check()
        self.full_reads += pooled is None and template is None
        wanted = None if statuses is None else set(statuses)
        out = [
            d
            for d in sorted(self.deps.values(), key=lambda d: d.created)
            if (template is None or d.template == template)
            and (wanted is None or d.status in wanted)
            and (pooled is None or d.pooled == pooled)
        ]
        return out[:limit] if limit else out

    async def active(
        self, *, template: str | None = None, status: Status | None = None
    ) -> list[Deployment]:
        self._check()
        wanted = set(ACTIVE) if status is None else {status}
        return [
            d
            for d in self.deps.values()
            if not d.pooled and d.status in wanted and template in (None, d.template)
        ]

    async def ended(self, *, template: str | None, numbers: list[int]) -> list[Deployment]:
        self._check()
        wanted = set(numbers)
        return [
            d
            for d in self.deps.values()
            if (d.ended_seq if template is None else d.template_number) in wanted
            and template in (None, d.template)
        ]

    async def ended_range(self, template: str | None) -> tuple[int, int]:
        self._check()
        return 1, self.counters.get("ended" if template is None else f"ended:{template}", 0)

    async def remove_ended(self, before: datetime) -> int:
        self._check()
        gone = [
            d.id
            for d in self.deps.values()
            if d.status.final and (d.ended_at or d.created) < before
        ]
        for dep_id in gone:
            del self.deps[dep_id]
        return len(gone)

    async def search(self, query: Search) -> tuple[list[Deployment], int]:
        self._check()
        chosen = [
            d
            for d in self.deps.values()
            if not d.pooled
            and (query.status is None or d.status is query.status)
            and (query.template is None or d.template == query.template)
            and (not query.text or query.text in f"{d.id} {d.reason or ''}".lower())
        ]
        chosen.sort(key=SORTS[query.sort], reverse=query.descending)
        return chosen[query.offset : query.offset + query.limit], len(chosen)

    async def status_counts(self) -> dict[str, int]:
        self._check()
        counts = {s.value: 0 for s in Status}
        for dep in self.deps.values():
            counts[dep.status.value] += 0 if dep.pooled else 1
        return counts

    async def progress(self, dep_id: str, message: str) -> None:
        self._check()
        self._tell(progress=(dep_id, message))

    async def events(self) -> AsyncIterator[Event]:
        self._events = asyncio.Queue()
        while True:
            yield await self._events.get()

    async def hold(self, name: str, holder: str, *, seconds: float) -> Fence | None:
        self._check()
        at = time.monotonic()
        current = self.leases.get(name)
        if current is not None and current[0] == holder and current[2] > at:
            self.leases[name] = (holder, current[1], at + seconds)
            return Fence(name=name, holder=holder, epoch=current[1])
        if current is not None and current[2] > at:
            return None
        epoch = (current[1] if current else 0) + 1
        self.leases[name] = (holder, epoch, at + seconds)
        return Fence(name=name, holder=holder, epoch=epoch)

    async def release(self, fence: Fence) -> None:
        current = self.leases.get(fence.name)
        if current is not None and current[:2] == (fence.holder, fence.epoch):
            self.leases[fence.name] = (fence.holder, fence.epoch, 0.0)

    async def beat(self, server: str) -> None:
        self._check()
        self.beats[server] = time.monotonic()

    async def alive(self, *, within: float) -> set[str]:
        self._check()
        return {s for s, at in self.beats.items() if at > time.monotonic() - within}

    async def put_session(self, digest: str, expires: datetime) -> None:
        self._check()
        self.sessions[digest] = expires

    async def session_valid(self, digest: str) -> bool:
        self._check()
        expires = self.sessions.get(digest)
        return expires is not None and expires > now()

    async def end_session(self, digest: str) -> None:
        self._check()
        self.sessions.pop(digest, None)

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
        self._check()
        dep = self.deps.get(dep_id)
        claim: dict[str, Any] = {
            "created": created,
            "cull_timeout_ms": cull_timeout_ms,
            "client": client,
            "urlpath": urlpath,
        }
        if dep is None:
            return False
        if dep.pooled and dep.status is Status.DEPLOYED:
            key = f"client:{client}"
            full = client_limit is not None and self.counters.get(key, 0) >= client_limit
            if client is not None and full:
                return Refusal.CLIENT
            self.deps[dep_id] = replace(dep, pooled=False, **claim)
            if client is not None:
                self.counters[key] = self.counters.get(key, 0) + 1
            self._tell(self.deps[dep_id])
            return True
        # claimed already: by this very claim (a retried write), or by another
        return not dep.pooled and all(getattr(dep, k) == v for k, v in claim.items())

    async def put_template(self, template: Template, *, seeded: Template | None = None) -> None:
        self._check()
        self.templates[template.name] = parse_template(template.to_api())
        if seeded is not None:
            self.seeds[template.name] = parse_template(seeded.to_api())

    async def list_templates(self) -> list[Template]:
        self._check()
        return sorted(self.templates.values(), key=lambda t: t.name)

    async def seeded_templates(self) -> dict[str, Template]:
        self._check()
        return dict(self.seeds)

    async def delete_template(self, name: str) -> bool:
        self._check()
        self.seeds.pop(name, None)
        return self.templates.pop(name, None) is not None


class FakeWindows:
    """At most ``amount`` events of each key in any ``seconds``, in memory (the per-client launch
    window of one server; the store's is the ``limits`` library's in the database)."""

    def __init__(
        self,
        *,
        amount: int = 1000,
        seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.amount = amount
        self.seconds = seconds
        self._clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self.down = False

    async def hit(self, key: str) -> float:
        if self.down:
            raise BadDatabaseError("database unreachable: fake outage")
        at = self._clock()
        events = self._events.setdefault(key, deque(maxlen=self.amount))
        if len(events) == self.amount and events[0] > at - self.seconds:
            return events[0] + self.seconds - at
        events.append(at)
        return 0.0


class FakeBackend:
    """Apps that are ready at once, unless told to fail with a reason."""

    def __init__(self) -> None:
        self.running: dict[str, Observed] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_with: str | None = None
        self.exit_with: str | None = None
        """Apps exit as soon as they start, with this reason: the backend tells of the exit, as
        the local backend's reaper does, and ``wait_ready`` fails with it once that is told."""
        self.exits: dict[str, str] = {}
        """Exit reasons of apps that exited on their own, forgotten when they are stopped (as a
        real backend forgets a stopped app)."""
        self.down = False
        self.paused: asyncio.Event | None = None
        """When set, writes wait for it after landing and before answering (a slow answer)."""
        self.landed = asyncio.Event()
        """Set when a paused write has landed."""
        self.retried_inserts = 0
        """Inserts that land, then answer a duplicate key (a driver's retry of a lost answer)."""
        self.notify: Notify | None = None
        self.api_calls: dict[str, int] = {}
        self.extra_loops: dict[str, Callable[[], Awaitable[None]]] = {}
        self.pings = 0
        self.ping_raises: Exception | None = None
        """An exception ``ping`` raises as it is, standing for a client error not translated."""
        self._told: dict[str, asyncio.Event] = {}
        self.specs: dict[str, LaunchSpec] = {}
        """What each launch was given, by deployment id."""
        self.output_of: Callable[[LaunchSpec], list[str]] | None = None
        """The output of an app (what ``output`` tells), made from its launch."""
        self.hold: threading.Event | None = None
        """When set, launches wait in ``wait_ready`` until it is set."""

    async def open(self, notify: Notify) -> None:
        self.notify = notify

    async def close(self) -> None:
        return None

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return dict(self.extra_loops)

    async def ping(self) -> None:
        self.pings += 1
        if self.ping_raises is not None:
            raise self.ping_raises
        if self.down:
            raise BadBackendError("backend unreachable: fake outage")

    async def launch(self, spec: LaunchSpec) -> Observed:
        self.calls.append(("launch", spec.id))
        self.specs[spec.id] = spec
        obs = Observed(
            id=spec.id,
            state=State.STARTING,
            target=f"http://fake/{spec.id}",
            ref={"n": len(self.calls)},
            template=spec.template.name,
        )
        self.running[spec.id] = obs
        if self.exit_with is not None:
            told = asyncio.Event()
            self._told[spec.id] = told
            asyncio.get_running_loop().create_task(self._exit(obs, self.exit_with, told))
        return obs

    async def _exit(self, obs: Observed, reason: str, told: asyncio.Event) -> None:
        self.running.pop(obs.id, None)
        self.exits[obs.id] = reason
        assert self.notify is not None
        try:
            await self.notify(replace(obs, state=State.EXITED, reason=reason))
        finally:
            told.set()

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        if self.hold is not None:  # set from the test's thread
            await anyio.to_thread.run_sync(self.hold.wait, 10.0)
        if self.fail_with:
            raise LaunchError(self.fail_with)
        told = self._told.pop(spec.id, None)
        if told is not None:
            await told.wait()
            raise LaunchError(self.exits.get(spec.id, "the app is gone (its exit is not known)"))
        return replace(observed, state=State.RUNNING)

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        self.calls.append(("stop", dep_id))
        self.running.pop(dep_id, None)
        self.exits.pop(dep_id, None)

    async def list(self) -> list[Observed]:
        return list(self.running.values())

    async def preload(self, template: Template) -> None:
        self.calls.append(("preload", template.name))

    async def preload_status(self, template: Template) -> str:
        return "completed"

    async def output(self, dep_id: str, *, lines: int) -> Lines:
        """What ``output_of`` makes of ``dep_id``'s launch, last ``lines`` of it."""
        spec = self.specs.get(dep_id)
        if self.output_of is None or spec is None:
            return []
        return self.output_of(spec)[-lines:]


class FakeProxy:
    def __init__(self) -> None:
        self.table: dict[str, ProxyRoute] = {}
        self.down = False
        self.paused: asyncio.Event | None = None
        """When set, writes wait for it after landing and before answering (a slow answer)."""
        self.landed = asyncio.Event()
        """Set when a paused write has landed."""
        self.retried_inserts = 0
        """Inserts that land, then answer a duplicate key (a driver's retry of a lost answer)."""
        self.listings = 0
        """How often the whole routing table was listed."""

    async def _answer(self) -> None:
        if self.paused is not None:
            self.landed.set()
            await self.paused.wait()

    def _check(self) -> None:
        if self.down:
            raise BadProxyError("proxy API unreachable: fake outage")

    async def aclose(self) -> None:
        return None

    async def ping(self) -> None:
        self._check()

    async def add_route(self, path: str, target: str) -> None:
        self._check()
        self.table[path] = ProxyRoute(target=target)

    async def remove_route(self, path: str) -> None:
        self._check()
        self.table.pop(path, None)

    async def routes(self) -> dict[str, ProxyRoute]:
        self._check()
        self.listings += 1
        return dict(self.table)

    async def route(self, path: str) -> str | None:
        self._check()
        return self.table[path].target if path in self.table else None
