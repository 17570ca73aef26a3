"""Launching: new deployments, pooled ones, and launches resumed after a restart or adopted
from a server that died.

A launch first takes its place in the caller's window of launches (:class:`ClientLimits`), then
is admitted: counted in (total, template, client) and written in one step by the store
(:meth:`Records.admit`), exact across servers. It answers as soon as its record is written; the
rest runs in a task: the backend object, readiness, the proxy route, then ``deployed``. The app
starts while the record is written when the launch is likely to be admitted (far from the
total); near it, only once it is.
"""

from __future__ import annotations

import asyncio
import time

from loguru import logger

from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend, LaunchSpec, Observed
from services.deploy_kubernetes.engine.catalog import Catalog
from services.deploy_kubernetes.engine.ending import Ender
from services.deploy_kubernetes.engine.launches import Launches
from services.deploy_kubernetes.engine.limits import Caller, ClientLimits
from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.records import Claim, Records
from services.deploy_kubernetes.errors import (
    BinderError,
    CapacityError,
    LaunchError,
    RateLimitedError,
)
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    Template,
    new_id,
    new_token,
    now,
)
from services.deploy_kubernetes.store.base import Change


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
        client_limits: ClientLimits,
        metrics: Metrics,
        changed: asyncio.Event,
        public_host: str,
        public_url: str,
        default_cull_timeout_ms: int,
        launch_timeout_seconds: float,
        server: str = "",
    ) -> None:
        self._server = server
        """This server's id, written as the ``owner`` of the launches it runs."""
        self._records = records
        self._catalog = catalog
        self._backend = backend
        self._proxy = proxy
        self._ender = ender
        self._launches = launches
        self._client_limits = client_limits
        self._metrics = metrics
        self._changed = changed
        self._public_host = public_host
        self._public_url = public_url.rstrip("/")
        self._default_cull = default_cull_timeout_ms
        self.timeout = launch_timeout_seconds

    async def launch(
        self,
        template_name: str,
        cull_timeout_ms: int | None,
        *,
        caller: Caller,
        urlpath: str = "",
    ) -> Deployment:
        """Launch ``template_name`` for ``caller``, within its per-client limits (429
        ``rateLimited``, its window checked first) and the servers' capacity (429
        ``capacity``); its ``url`` opens ``urlpath`` (a path checked by ``parse_urlpath``) below
        the app's base URL."""
        template = self._catalog.get(template_name)
        await self._client_limits.hit(caller)
        try:
            return await self._launch(
                template,
                cull_timeout_ms,
                client=caller.client,
                client_limit=self._client_limits.limit_for(caller),
                urlpath=urlpath,
            )
        except RateLimitedError:
            self._client_limits.refused_held()
            raise

    async def _launch(
        self,
        template: Template,
        cull_timeout_ms: int | None,
        *,
        client: str,
        client_limit: int | None,
        urlpath: str,
    ) -> Deployment:
        cull = cull_timeout_ms or template.cull_timeout_ms or self._default_cull
        started = time.monotonic()
        if template.pool_size:
            claim = Claim(created=now(), cull_timeout_ms=cull, client=client, urlpath=urlpath)
            claimed = await self._records.claim_pooled(
                template.name, claim, client_limit=client_limit
            )
            if claimed is not None:
                self._changed.set()
                self._metrics.launches.labels(template=template.name).inc()
                self._metrics.launch_latency.labels(pooled="true").observe(
                    time.monotonic() - started
                )
                return claimed  # the launch's log line (the route's) says it came from the pool
        dep = await self._start(
            template,
            cull_timeout_ms=cull,
            client=client,
            urlpath=urlpath,
            limit=template.max_deployments,
            client_limit=client_limit,
        )
        self._metrics.launches.labels(template=template.name).inc()  # accepted: its record is in
        return dep

    async def launch_pooled(self, template: Template) -> bool:
        """Start one instance into ``template``'s pool; False when the servers are full."""
        try:
            await self._start(template, cull_timeout_ms=self._default_cull, pooled=True)
        except CapacityError:
            return False
        return True

    async def _start(
        self,
        template: Template,
        *,
        cull_timeout_ms: int,
        client: str | None = None,
        urlpath: str = "",
        pooled: bool = False,
        limit: int | None = None,
        client_limit: int | None = None,
    ) -> Deployment:
        """Admit the launch and write its ``deploying`` record, and start it; answer once the
        record is written.

        Where the launch is likely admitted, the app starts while its record is being written
        (the write does not delay the spawn, and concurrent launches' writes do not space their
        spawns out); nothing else is done on its behalf until the record is in the database. A
        record that cannot be written, or a launch refused, ends the launch and stops what it
        started; a crash in between leaves an app without a record, which the leader's
        reconcile stops (no client was told of it). Near the total the app starts only once the
        launch is admitted, so a burst beyond capacity starts no app it then stops."""
        dep = Deployment(
            id=new_id(),
            template=template.name,
            status=Status.DEPLOYING,
            created=now(),
            cull_timeout_ms=cull_timeout_ms,
            client=client,
            pooled=pooled,
            urlpath=urlpath,
            token=new_token() if template.takes_token else None,
            owner=self._server or None,
        )
        if not self._records.likely_admitted():
            await self._records.admit(dep, template_limit=limit, client_limit=client_limit)
            self._launches.start(dep.id, self._run(dep, template, None, None))
            return dep
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._launches.start(dep.id, self._run(dep, template, None, written))
        try:
            await self._records.admit(dep, template_limit=limit, client_limit=client_limit)
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
        if isinstance(error, LaunchError) and reason.startswith("timed out "):
            reason = f"timed out after {self.timeout:g} s {reason.removeprefix('timed out ')}"
        await self._ender.fail(dep, reason)

    async def _bring_up(
        self,
        dep: Deployment,
        template: Template,
        observed: Observed | None,
        written: asyncio.Future[None] | None,
    ) -> None:
        spec = LaunchSpec(id=dep.id, template=template, token=dep.token or "", pooled=dep.pooled)
        elapsed = (now() - dep.created).total_seconds()
        deadline = time.monotonic() + max(1.0, self.timeout - elapsed)
        if observed is None:  # found again by its id (labels, environment) after a crash
            observed = await self._backend.launch(spec)
        observed = await self._backend.wait_ready(spec, observed, deadline=deadline)
        assert observed.target is not None
        if written is not None:
            await written  # nothing more on its behalf until its record is in the database
        await self._proxy.add_route(dep.route, observed.target)
        location = f"{self._public_host}/user/{dep.id}"
        change = Change(
            location=location,
            url=f"{self._public_url}/user/{dep.id}/",  # with its urlpath and token: to_api
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
