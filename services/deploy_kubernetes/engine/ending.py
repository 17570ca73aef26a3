"""Ending deployments: deletes, failures and the clean-up after them.

A final status is written before anything is torn down. When it cannot be written now (the
database is away), it waits in an outbox that is retried until it lands, and the clean-up that
depends on it waits with it; meanwhile nothing puts the deployment's route back (the keeper
asks :meth:`Ender.ending`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loguru import logger

from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend
from services.deploy_kubernetes.engine.launches import Launches
from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.output import AppOutput
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.errors import BadDatabaseError, BinderError
from services.deploy_kubernetes.models import Deployment, Status, now
from services.deploy_kubernetes.store.base import Change


@dataclass(frozen=True)
class Pending:
    dep: Deployment
    to: Status
    reason: str


class Ender:
    def __init__(
        self,
        *,
        records: Records,
        backend: Backend,
        output: AppOutput,
        proxy: Proxy,
        launches: Launches,
        metrics: Metrics,
        changed: asyncio.Event,
    ) -> None:
        self._records = records
        self._backend = backend
        self._output = output
        self._proxy = proxy
        self._launches = launches
        self._metrics = metrics
        self._changed = changed
        self._outbox: dict[str, Pending] = {}

    def ending(self, dep_id: str) -> bool:
        """True while ``dep_id``'s final status waits in the outbox."""
        return dep_id in self._outbox

    async def end(self, dep: Deployment, to: Status, reason: str) -> Deployment:
        """Write the final status, then stop the launch task, the backend object and the route.

        Raises ``BadDatabaseError`` (nothing torn down) when the status cannot be written."""
        moved = await self._records.move(dep, to, Change(reason=reason, ended_at=now()))
        self._outbox.pop(dep.id, None)
        await self._launches.cancel(dep.id)
        current = moved or self._records.cached(dep.id) or dep
        await self.teardown(current if current.backend_ref else dep)
        self._changed.set()
        return current

    async def fail(self, dep: Deployment, reason: str) -> None:
        """Mark ``dep`` failed (if it is not final already) for ``reason``, followed by the
        app's last lines of output, and clean up; while the database is away the failure waits
        in the outbox."""
        self._metrics.errors.labels(type="launch").inc()
        if not dep.status.final:
            reason = await self._output.reason(dep, reason)
        try:
            await self.end(dep, Status.FAILED, reason)
        except BadDatabaseError as exc:
            logger.bind(id=dep.id).warning(
                "failure ({}) not recorded yet, will retry: {}", reason, exc.message
            )
            self._outbox[dep.id] = Pending(dep, Status.FAILED, reason)
            await self._launches.cancel(dep.id)

    async def delete(self, dep: Deployment, reason: str) -> Deployment:
        if dep.status.final:
            return dep
        return await self.end(dep, Status.DELETED, reason)

    async def flush(self) -> int:
        """Write what waits in the outbox; returns how many still wait."""
        for pending in list(self._outbox.values()):
            try:
                await self.end(pending.dep, pending.to, pending.reason)
            except BadDatabaseError:
                break
        return len(self._outbox)

    async def teardown(self, dep: Deployment) -> None:
        """Stop ``dep``'s backend object and remove its route; what fails is logged."""
        try:
            await self._backend.stop(dep.id, dep.backend_ref)
        except BinderError as exc:
            logger.bind(id=dep.id).warning("clean-up incomplete: {}", exc.message)
        try:
            await self._proxy.remove_route(dep.route)
        except BinderError as exc:
            logger.bind(id=dep.id).warning("clean-up incomplete: {}", exc.message)
