"""Hand-written fakes of the deploy server's ports, for unit tests of the logic above them.
They record calls and can be told to fail. The contract tests keep them honest."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

from services.deploy_kubernetes.backends.base import LaunchSpec, Notify, Observed, State
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
    parse_template,
    sources_of,
)
from services.deploy_kubernetes.store import Change

ACTIVE = (Status.DEPLOYING, Status.DEPLOYED)


class FakeStore:
    def __init__(self) -> None:
        self.deps: dict[str, Deployment] = {}
        self.templates: dict[str, Template] = {}
        self.down = False
        self.paused: asyncio.Event | None = None
        """When set, writes wait for it after landing and before answering (a slow answer)."""
        self.landed = asyncio.Event()
        """Set when a paused write has landed."""
        self.retried_inserts = 0
        """Inserts that land, then answer a duplicate key (a driver's retry of a lost answer)."""
        self.full_reads = 0
        """Reads of every active deployment, pooled or not (what the keeper reads)."""

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
        self._check()
        if dep.id in self.deps:
            raise ConflictError("a record with that id exists already")
        self.deps[dep.id] = dep
        if self.retried_inserts:  # the write landed, its answer was lost, the retry collides
            self.retried_inserts -= 1
            raise ConflictError("a record with that id exists already")

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
        self.deps[dep_id] = replace(dep, status=to, **change.values())
        await self._answer()
        if known is not None:  # as the real store: built from the known record
            return replace(known, status=to, **change.values())
        return self.deps[dep_id]

    async def update(
        self, dep_id: str, change: Change, *, known: Deployment | None = None
    ) -> Deployment | None:
        self._check()
        if dep_id not in self.deps:
            return None
        self.deps[dep_id] = replace(self.deps[dep_id], **change.values())
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

    async def claim(
        self, dep_id: str, *, created: datetime, cull_timeout_ms: int, client: str | None
    ) -> bool:
        self._check()
        dep = self.deps.get(dep_id)
        claim = {"created": created, "cull_timeout_ms": cull_timeout_ms, "client": client}
        if dep is None:
            return False
        if dep.pooled and dep.status is Status.DEPLOYED:
            self.deps[dep_id] = replace(dep, pooled=False, **claim)
            return True
        # claimed already: by this very claim (a retried write), or by another
        return not dep.pooled and all(getattr(dep, k) == v for k, v in claim.items())

    async def put_template(self, template: Template) -> None:
        self._check()
        self.templates[template.name] = parse_template(template.to_api())

    async def get_template(self, name: str) -> Template | None:
        self._check()
        return self.templates.get(name)

    async def list_templates(self) -> list[Template]:
        self._check()
        return sorted(self.templates.values(), key=lambda t: t.name)

    async def delete_template(self, name: str) -> bool:
        self._check()
        return self.templates.pop(name, None) is not None


class FakeBackend:
    """Apps that are ready at once, unless told to fail with a reason."""

    name = "fake"
    ready_at_target = False  # launches check their route through the (fake) proxy

    def __init__(self) -> None:
        self.running: dict[str, Observed] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_with: str | None = None
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
        obs = Observed(
            spec.id,
            State.STARTING,
            f"http://fake/{spec.id}",
            {"n": len(self.calls)},
            None,
            spec.template.name,
        )
        self.running[spec.id] = obs
        return obs

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        if self.fail_with:
            raise LaunchError(self.fail_with)
        return replace(observed, state=State.RUNNING)

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        self.calls.append(("stop", dep_id))
        self.running.pop(dep_id, None)

    async def list(self) -> list[Observed]:
        return list(self.running.values())

    async def preload(self, template: Template) -> None:
        self.calls.append(("preload", template.name))

    async def preload_status(self, template: Template) -> str:
        return "completed"


class FakeProxy:
    def __init__(self) -> None:
        self.table: dict[str, tuple[str, datetime | None]] = {}
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
        self.table[path] = (target, None)

    async def remove_route(self, path: str) -> None:
        self._check()
        self.table.pop(path, None)

    async def routes(self) -> dict[str, tuple[str, datetime | None]]:
        self._check()
        self.listings += 1
        return dict(self.table)

    async def route(self, path: str) -> str | None:
        self._check()
        return self.table[path][0] if path in self.table else None

    async def public_get(self, path: str) -> int:
        return 200 if any(path.startswith(p) for p in self.table) else 404
