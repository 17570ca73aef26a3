"""The deploy server's core: launches, status changes, deletes, and the events they publish.

Every status change goes through :meth:`Deployer.move`, which writes it to the store first (guarded
by the allowed transitions) and only then updates the in-memory view and tells watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator
from typing import Any

from loguru import logger

from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend, LaunchSpec, Observed, State
from services.deploy_kubernetes.errors import (
    BinderError,
    CapacityError,
    LaunchError,
    NoRecordError,
    NoTemplateError,
)
from services.deploy_kubernetes.metrics import BackendCalls, Metrics
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    Template,
    check_id,
    check_name,
    new_id,
    now,
    sources_of,
)
from services.deploy_kubernetes.store import Store

CACHE_SIZE = 20_000
PROXY_CHECK_SECONDS = 10.0
PROGRESS_KEPT = 20


class Deployer:
    def __init__(
        self,
        *,
        store: Store,
        backend: Backend,
        proxy: Proxy,
        metrics: Metrics,
        public_host: str,
        max_deployments: int,
        default_cull_timeout_ms: int,
        launch_timeout_seconds: float,
    ) -> None:
        self.store = store
        self.backend = backend
        self.proxy = proxy
        self.metrics = metrics
        self.public_host = public_host
        self.max_deployments = max_deployments
        self.default_cull_timeout_ms = default_cull_timeout_ms
        self.launch_timeout = launch_timeout_seconds
        self.templates: dict[str, Template] = {}
        self._cache: OrderedDict[str, Deployment] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, set[asyncio.Queue[Deployment | str]]] = {}
        self._progress: dict[str, deque[str]] = {}
        self._capacity_lock = asyncio.Lock()
        self.pool_wakeup = asyncio.Event()
        metrics.registry.register(BackendCalls(lambda: dict(backend.api_calls)))

    # --- the in-memory view -------------------------------------------------------------------

    def _remember(self, dep: Deployment) -> None:
        self._cache[dep.id] = dep
        self._cache.move_to_end(dep.id)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        if dep.status is not Status.DEPLOYING:
            self._progress.pop(dep.id, None)
        for queue in self._watchers.get(dep.id, ()):
            queue.put_nowait(dep)

    def progress(self, dep_id: str, message: str) -> None:
        """Tell ``dep_id``'s watchers a backend's progress message (not a status change); the
        last few are kept while it deploys, for watchers who come later."""
        dep = self._cache.get(dep_id)
        if dep is None or dep.status is not Status.DEPLOYING:
            return
        self._progress.setdefault(dep_id, deque(maxlen=PROGRESS_KEPT)).append(message)
        for queue in self._watchers.get(dep_id, ()):
            queue.put_nowait(message)

    async def get(self, template: str, dep_id: str) -> Deployment:
        check_name(template)
        check_id(dep_id)
        dep = self._cache.get(dep_id)
        if dep is None:
            dep = await self.store.get(dep_id)
            if dep is not None:
                self._remember(dep)  # this server is the records' only writer
        if dep is None or dep.template != template or dep.pooled:
            raise NoRecordError(f"no deployment {dep_id} of template {template}")
        return dep

    async def watch(self, template: str, dep_id: str) -> AsyncGenerator[Deployment | str, None]:
        """The deployment now, then each change (and progress message), until a final status."""
        dep = await self.get(template, dep_id)
        queue: asyncio.Queue[Deployment | str] = asyncio.Queue()
        self._watchers.setdefault(dep_id, set()).add(queue)
        try:
            dep = self._cache.get(dep_id, dep)
            yield dep
            for message in list(self._progress.get(dep_id, ())):
                yield message
            while not dep.status.final:
                item = await queue.get()
                if isinstance(item, Deployment):
                    dep = item
                yield item
        finally:
            watchers = self._watchers.get(dep_id, set())
            watchers.discard(queue)
            if not watchers:
                self._watchers.pop(dep_id, None)

    # --- status changes -----------------------------------------------------------------------

    async def move(self, dep: Deployment, to: Status, **fields: Any) -> Deployment | None:
        """Write ``dep``'s move to status ``to`` (if still allowed) before anything acts on it."""
        if to.final:
            fields.setdefault("ended_at", now())
        moved = await self.store.transition(dep.id, sources_of(to), to, **fields)
        if moved is None:
            current = await self.store.get(dep.id)
            if current is not None:
                self._remember(current)
            return None
        self._remember(moved)
        self.metrics.transitions.labels(status=to.value).inc()
        log = logger.bind(id=dep.id, template=dep.template)
        if to is Status.FAILED:
            log.warning("failed: {}", fields.get("reason"))
        else:
            log.info("{}{}", to.value, f": {fields['reason']}" if fields.get("reason") else "")
        return moved

    # --- templates ----------------------------------------------------------------------------

    async def load_templates(self) -> None:
        self.templates = {t.name: t for t in await self.store.list_templates()}

    def template(self, name: str) -> Template:
        check_name(name)
        template = self.templates.get(name)
        if template is None:
            raise NoTemplateError(f"no template named {name}")
        return template

    async def put_template(self, template: Template) -> None:
        await self.store.put_template(template)
        self.templates[template.name] = template
        self.pool_wakeup.set()

    async def delete_template(self, name: str) -> None:
        self.template(name)
        await self.store.delete_template(name)
        self.templates.pop(name, None)
        self.pool_wakeup.set()

    # --- launch -------------------------------------------------------------------------------

    async def launch(self, template_name: str, cull_timeout_ms: int | None) -> Deployment:
        template = self.template(template_name)
        cull = cull_timeout_ms or template.cull_timeout_ms or self.default_cull_timeout_ms
        self.metrics.launches.labels(template=template.name).inc()
        started = time.monotonic()
        if template.pool_size:
            claimed = await self.store.claim_pooled(
                template.name, created=now(), cull_timeout_ms=cull
            )
            if claimed is not None:
                self._remember(claimed)
                self.pool_wakeup.set()
                self.metrics.launch_latency.labels(pooled="true").observe(
                    time.monotonic() - started
                )
                logger.bind(id=claimed.id, template=template.name).info("launched from the pool")
                return claimed
        async with self._capacity_lock:
            await self._check_capacity(template)
            dep = Deployment(
                id=new_id(),
                template=template.name,
                status=Status.DEPLOYING,
                created=now(),
                cull_timeout_ms=cull,
            )
            await self.store.insert(dep)
        self._remember(dep)
        self.start_launch(dep, template)
        return dep

    async def _check_capacity(self, template: Template) -> None:
        if await self.store.count_active() >= self.max_deployments:
            self.metrics.errors.labels(type="capacity").inc()
            raise CapacityError(
                f"the server runs its maximum of {self.max_deployments} deployments; retry later",
                headers={"Retry-After": "30"},
            )
        limit = template.max_deployments
        if limit is not None and await self.store.count_active(template=template.name) >= limit:
            self.metrics.errors.labels(type="capacity").inc()
            raise CapacityError(
                f"template {template.name} runs its maximum of {limit} deployments; retry later",
                headers={"Retry-After": "30"},
            )

    async def launch_pooled(self, template: Template) -> None:
        """Start one instance into ``template``'s pool (within the total capacity)."""
        async with self._capacity_lock:
            if await self.store.count_active() >= self.max_deployments:
                return
            dep = Deployment(
                id=new_id(),
                template=template.name,
                status=Status.DEPLOYING,
                created=now(),
                cull_timeout_ms=self.default_cull_timeout_ms,
                pooled=True,
            )
            await self.store.insert(dep)
        self._remember(dep)
        self.start_launch(dep, template)

    def start_launch(
        self, dep: Deployment, template: Template, observed: Observed | None = None
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._run_launch(dep, template, observed))
        self._tasks[dep.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(dep.id, None))

    def launching(self, dep_id: str) -> bool:
        return dep_id in self._tasks

    async def _run_launch(
        self, dep: Deployment, template: Template, observed: Observed | None
    ) -> None:
        log = logger.bind(id=dep.id, template=template.name)
        spec = LaunchSpec(dep.id, template)
        deadline = time.monotonic() + max(
            1.0, self.launch_timeout - (now() - dep.created).total_seconds()
        )
        try:
            if observed is None:
                observed = await self.backend.launch(spec)
                dep = (
                    await self.store.update(
                        dep.id, target=observed.target, backend_ref=observed.ref
                    )
                    or dep
                )
            observed = await self.backend.wait_ready(spec, observed, deadline=deadline)
            assert observed.target is not None
            await self.proxy.add_route(dep.route, observed.target)
            await self._await_route(dep, deadline)
            location = f"{self.public_host}/user/{dep.id}"
            moved = await self.move(
                dep,
                Status.DEPLOYED,
                location=location,
                url=f"http://{location}/",
                target=observed.target,
                backend_ref=observed.ref,
                deployed_at=now(),
            )
            if moved is None:  # deleted while launching
                await self._teardown(dep)
                return
            if not dep.pooled:
                elapsed = (now() - dep.created).total_seconds()
                self.metrics.launch_latency.labels(pooled="false").observe(elapsed)
        except asyncio.CancelledError:
            raise
        except BinderError as exc:
            reason = exc.message
            if isinstance(exc, LaunchError) and reason.startswith("timed out"):
                reason = f"timed out after {self.launch_timeout:g} s waiting for the app to answer"
            await self.fail(dep, reason)
        except Exception as exc:  # a launch task must always end in a final status
            log.opt(exception=exc).error("launch failed unexpectedly")
            await self.fail(dep, f"internal error: {exc.__class__.__name__}")
        finally:
            self.pool_wakeup.set()

    async def _await_route(self, dep: Deployment, deadline: float) -> None:
        """The route works once the proxy serves it (answers it with anything but its 404).

        The app itself was found ready by the backend: by its own answer (local, docker) or by
        its Pod's readiness probe (kubernetes). Through the proxy it must answer too: the proxy's
        own 404 (no route yet) and its 5xx (target unreachable) do not count.
        """
        interval = 0.01
        while True:
            code = await self.proxy.public_get(dep.route + "/")
            if code and code != 404 and code < 500:
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"the proxy does not serve {dep.route} (last answer {code})")
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.25)

    async def fail(self, dep: Deployment, reason: str) -> None:
        """Mark ``dep`` failed with ``reason`` (if it is not final already) and clean up after it."""
        self.metrics.errors.labels(type="launch").inc()
        try:
            await self.end(dep, Status.FAILED, reason)
        except BinderError as exc:
            logger.bind(id=dep.id).warning(
                "could not record the failure ({}): {}", reason, exc.message
            )
            await self._teardown(dep)

    async def end(self, dep: Deployment, to: Status, reason: str) -> Deployment:
        """Write the final status, then stop the launch task, the backend object and the route."""
        moved = await self.move(dep, to, reason=reason)
        task = self._tasks.get(dep.id)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._teardown(moved or dep)
        self.pool_wakeup.set()
        return moved or self._cache.get(dep.id, dep)

    async def _teardown(self, dep: Deployment) -> None:
        ref = dep.backend_ref
        cached = self._cache.get(dep.id)
        if cached is not None and cached.backend_ref:
            ref = cached.backend_ref
        for step in (self.backend.stop(dep.id, ref), self.proxy.remove_route(dep.route)):
            try:
                await step
            except BinderError as exc:
                logger.bind(id=dep.id).warning("clean-up incomplete: {}", exc.message)

    # --- delete, exits --------------------------------------------------------------------------

    async def delete(
        self, template: str, dep_id: str, *, reason: str = "deleted by request"
    ) -> Deployment:
        dep = await self.get(template, dep_id)
        if dep.status.final:
            return dep
        return await self.end(dep, Status.DELETED, reason)

    async def on_backend_event(self, observed: Observed) -> None:
        """A backend object exited or vanished on its own, or told a progress message."""
        if observed.event is not None:
            self.progress(observed.id, observed.event)
            return
        if observed.state is not State.EXITED:
            return
        dep = self._cache.get(observed.id) or await self.store.get(observed.id)
        if dep is None or dep.status.final:
            await self.backend.stop(observed.id, observed.ref)
            return
        if dep.status is Status.DEPLOYING and self.launching(dep.id):
            return  # the launch task sees the exit and fails with its reason
        await self.fail(dep, observed.reason or "the app stopped")

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
