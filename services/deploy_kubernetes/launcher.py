"""Launching: new deployments, pooled ones, and launches resumed after a restart.

A launch answers as soon as its record is written (capacity reserved in memory by
:class:`Records`, so concurrent launches do not wait on each other); the rest runs in a task:
the backend object, readiness, the proxy route, then ``deployed``.
"""

from __future__ import annotations

import asyncio
import time

from loguru import logger

from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend, LaunchSpec, Observed
from services.deploy_kubernetes.catalog import Catalog
from services.deploy_kubernetes.ending import Ender, Launches
from services.deploy_kubernetes.errors import BinderError, LaunchError
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status, Template, new_id, now
from services.deploy_kubernetes.records import Records
from services.deploy_kubernetes.store import Change


class Launcher:
    def __init__(
        self,
        *,
        records: Records,
        catalog: Catalog,
        backend: Backend,
        proxy: Proxy,
        ender: Ender,
        launches: Launches,
        metrics: Metrics,
        changed: asyncio.Event,
        public_host: str,
        default_cull_timeout_ms: int,
        launch_timeout_seconds: float,
    ) -> None:
        self._records = records
        self._catalog = catalog
        self._backend = backend
        self._proxy = proxy
        self._ender = ender
        self._launches = launches
        self._metrics = metrics
        self._changed = changed
        self._public_host = public_host
        self._default_cull = default_cull_timeout_ms
        self.timeout = launch_timeout_seconds

    async def launch(
        self, template_name: str, cull_timeout_ms: int | None, *, client: str | None = None
    ) -> Deployment:
        """Launch ``template_name`` for ``client`` (``api-key`` or an address, for the record)."""
        template = self._catalog.get(template_name)
        cull = cull_timeout_ms or template.cull_timeout_ms or self._default_cull
        self._metrics.launches.labels(template=template.name).inc()
        started = time.monotonic()
        if template.pool_size:
            claimed = await self._records.claim_pooled(
                template.name, created=now(), cull_timeout_ms=cull, client=client
            )
            if claimed is not None:
                self._changed.set()
                self._metrics.launch_latency.labels(pooled="true").observe(
                    time.monotonic() - started
                )
                return claimed  # the launch's log line (the route's) says it came from the pool
        return await self._start(
            template, cull_timeout_ms=cull, client=client, limit=template.max_deployments
        )

    async def launch_pooled(self, template: Template) -> bool:
        """Start one instance into ``template``'s pool; False when the server is full."""
        if not self._records.has_room():
            return False
        await self._start(template, cull_timeout_ms=self._default_cull, pooled=True)
        return True

    async def _start(
        self,
        template: Template,
        *,
        cull_timeout_ms: int,
        client: str | None = None,
        pooled: bool = False,
        limit: int | None = None,
    ) -> Deployment:
        """Reserve capacity, start the launch and write its ``deploying`` record at once; answer
        once the record is written.

        The app starts while its record is being written (the write no longer delays the spawn,
        and concurrent launches' writes no longer space their spawns out); nothing else is done
        on its behalf until the record is in the database. A record that cannot be written ends
        the launch and stops what it started; a crash in between leaves an app without a record,
        which the next server's reconcile stops (no client was told of it)."""
        dep = Deployment(
            id=new_id(),
            template=template.name,
            status=Status.DEPLOYING,
            created=now(),
            cull_timeout_ms=cull_timeout_ms,
            client=client,
            pooled=pooled,
        )
        self._records.reserve(dep, template_limit=limit)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._launches.start(dep.id, self._run(dep, template, None, written))
        try:
            await self._records.write_new(dep)
        except BaseException:
            written.cancel()
            await self._launches.cancel(dep.id)
            await self._ender.teardown(dep)  # what it started, found by the deployment's id
            raise
        written.set_result(None)
        return dep

    def resume(self, dep: Deployment, template: Template, observed: Observed | None = None) -> None:
        """Go on with ``dep``'s launch (its record written) in a task of its own."""
        self._launches.start(dep.id, self._run(dep, template, observed, None))

    def running(self, dep_id: str) -> bool:
        return self._launches.running(dep_id)

    async def _run(
        self,
        dep: Deployment,
        template: Template,
        observed: Observed | None,
        written: asyncio.Future[None] | None,
    ) -> None:
        try:
            await self._bring_up(dep, template, observed, written)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if written is None or await _landed(written):
                await self._failed(dep, exc)
        finally:
            self._changed.set()

    async def _failed(self, dep: Deployment, error: Exception) -> None:
        """End ``dep`` failed for ``error`` (its record is written): a launch task must always
        end in a final status."""
        if not isinstance(error, BinderError):
            logger.bind(id=dep.id).opt(exception=error).error("launch failed unexpectedly")
            await self._ender.fail(dep, f"internal error: {error.__class__.__name__}")
            return
        reason = error.message
        if isinstance(error, LaunchError) and reason.startswith("timed out"):
            reason = f"timed out after {self.timeout:g} s waiting for the app to answer"
        await self._ender.fail(dep, reason)

    async def _bring_up(
        self,
        dep: Deployment,
        template: Template,
        observed: Observed | None,
        written: asyncio.Future[None] | None,
    ) -> None:
        spec = LaunchSpec(dep.id, template)
        elapsed = (now() - dep.created).total_seconds()
        deadline = time.monotonic() + max(1.0, self.timeout - elapsed)
        if observed is None:  # found again by its id (labels, environment) after a crash
            observed = await self._backend.launch(spec)
        observed = await self._backend.wait_ready(spec, observed, deadline=deadline)
        assert observed.target is not None
        if written is not None:
            await written  # nothing more on its behalf until its record is in the database
        await self._proxy.add_route(dep.route, observed.target)
        if not self._backend.ready_at_target:
            await self._await_route(dep, deadline)
        location = f"{self._public_host}/user/{dep.id}"
        change = Change(
            location=location,
            url=f"http://{location}/",
            target=observed.target,
            backend_ref=observed.ref,
            deployed_at=now(),
        )
        moved = await self._records.move(dep, Status.DEPLOYED, change)
        if moved is None:  # deleted while launching: the delete tore down what it knew of
            await self._ender.teardown(dep.evolve(backend_ref=observed.ref))
            return
        if not dep.pooled:
            elapsed = (now() - dep.created).total_seconds()
            self._metrics.launch_latency.labels(pooled="false").observe(elapsed)

    async def _await_route(self, dep: Deployment, deadline: float) -> None:
        """The route works once the app answers through the proxy (below 500, and not the
        proxy's own 404 for a route it does not know yet).

        Asked only where the backend's readiness was not seen from this host (a Pod's, by its
        kubelet): this checks that the proxy reaches the app too (a pod network the proxy's
        host cannot reach shows here, as the proxy's 503). An app that answered the local or
        docker backend's probe at its target answered from the proxy's own host."""
        interval = 0.01
        while True:
            code = await self._proxy.public_get(dep.route + "/")
            if code and code != 404 and code < 500:
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"the proxy does not serve {dep.route} (last answer {code})")
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.25)


async def _landed(written: asyncio.Future[None]) -> bool:
    """Whether the launch's record was written; when it was not, the launch's starter ends the
    launch and stops what it started."""
    try:
        await written
    except asyncio.CancelledError:
        if written.cancelled():
            return False
        raise  # the launch itself is cancelled
    return True
