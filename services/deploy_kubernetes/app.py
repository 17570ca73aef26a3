"""``create_app``: the deploy server as a Starlette application (run by uvicorn with --factory).

The composition root: the one place that knows every layer. It builds the configured backend and
store, the engine's :class:`~services.deploy_kubernetes.engine.deployer.Deployer` on them, and the
route table of the JSON API (:mod:`.api`) and of the web front end (:mod:`.web`)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware

from common.errors import ConfigError
from common.proxy import Proxy, ProxyClient
from common.settings import Settings
from common.web import EXCEPTION_HANDLERS
from services.deploy_kubernetes.api.access import AccessLog
from services.deploy_kubernetes.api.answers import StatusAnswers
from services.deploy_kubernetes.api.caller import CallerMiddleware
from services.deploy_kubernetes.api.client_names import error_handler
from services.deploy_kubernetes.api.openapi import openapi_document
from services.deploy_kubernetes.api.routes import API_ROUTES
from services.deploy_kubernetes.api.streams import EventStreams
from services.deploy_kubernetes.backends.base import Backend, Observed
from services.deploy_kubernetes.engine.deployer import Deployer, Options
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Status, now
from services.deploy_kubernetes.store.base import Change, Database, Windows
from services.deploy_kubernetes.store.mongo import MongoStore
from services.deploy_kubernetes.store.windows import MongoWindows
from services.deploy_kubernetes.web.console import Console
from services.deploy_kubernetes.web.openapi_pages import page_paths
from services.deploy_kubernetes.web.routes import WEB_ROUTES

STOP_AT_ONCE = 32
"""Apps stopped at once by :func:`stop_apps` (each may take its grace to end)."""


def build_backend(settings: Settings, *, record_delay: float = 0.0) -> Backend:
    """The backend the settings name; ``record_delay`` is a fault-injection tests' hook of the
    local backend (see ``__main__``)."""
    if settings.deploy.backend == "local" and settings.deploy.local.sandbox:
        from services.deploy_kubernetes.backends.local.folders import workdir_root
        from services.deploy_kubernetes.backends.local.sandboxed import SandboxedBackend

        return SandboxedBackend(
            state_dir=settings.home / "run" / "local",
            log_dir=settings.home / "logs" / "apps",
            settings=settings.deploy.local,
            home=settings.home,
            hidden=(workdir_root(settings.deploy.local),),
            record_delay=record_delay,
        )
    if settings.deploy.backend == "local":
        from services.deploy_kubernetes.backends.local.backend import LocalBackend
        from services.deploy_kubernetes.backends.local.folders import workdir_root
        from services.deploy_kubernetes.backends.local.users import app_user

        return LocalBackend(
            state_dir=settings.home / "run" / "local",
            log_dir=settings.home / "logs" / "apps",
            user=app_user(settings.deploy.local),
            workdirs=workdir_root(settings.deploy.local),
            home=settings.home,
            record_delay=record_delay,
        )
    if settings.deploy.backend == "docker":
        from services.deploy_kubernetes.backends.docker.backend import DockerBackend

        docker = settings.deploy.docker
        return DockerBackend(
            host=docker.host,
            suite=docker.label(settings.home),
            log_dir=settings.home / "logs" / "apps",
        )
    if settings.deploy.backend == "kubernetes":
        from services.deploy_kubernetes.backends.kubernetes.backend import KubernetesBackend

        k = settings.deploy.kubernetes
        return KubernetesBackend(
            kubeconfig=k.kubeconfig, namespace=k.namespace, suite=k.suite_label
        )
    raise ConfigError(f"backend {settings.deploy.backend!r} is not available in this build")


def build_store(settings: Settings) -> MongoStore:
    return MongoStore(uri=settings.db.effective_uri, database=settings.db.database)


def build_windows(settings: Settings) -> MongoWindows:
    return MongoWindows(
        uri=settings.db.effective_uri,
        database=settings.db.database,
        per_minute=settings.deploy.per_client_launches_per_minute,
    )


def host_name(settings: Settings) -> str:
    """What tells this host (and its proxy) apart from the others sharing the database."""
    return f"{socket.gethostname()} {settings.proxy.api_url}"


def options(settings: Settings, *, keeper_interval: float = 2.0) -> Options:
    d = settings.deploy
    return Options(
        launch_requires_key=d.launch_requires_key,
        templates_dir=settings.templates_dir,
        public_host=settings.public_host,
        public_url=settings.public_url,
        pages_target=d.local_url,
        max_deployments=d.max_deployments,
        per_client_max_deployments=d.per_client_max_deployments,
        per_client_launches_per_minute=d.per_client_launches_per_minute,
        default_cull_timeout_ms=d.default_cull_timeout_ms,
        launch_timeout_seconds=d.launch_timeout_seconds,
        cull_interval=d.cull_interval_seconds,
        max_age_seconds=d.max_age_seconds,
        keeper_interval=keeper_interval,
        lease_seconds=d.leader_lease_seconds,
        history_days=d.history_days,
        host=host_name(settings),
    )


def create_app(
    settings: Settings,
    *,
    backend: Backend | None = None,
    store: Database | None = None,
    windows: Windows | None = None,
    proxy: Proxy | None = None,
    keeper_interval: float = 2.0,
    collectors: tuple[Collector, ...] = (),
    wait_started: float = 0.0,
) -> Starlette:
    """The deploy API; ``backend``, ``store``, ``windows`` and ``proxy`` default to the
    configured real ones.

    ``collectors`` are added to its /metrics (the log sink's dropped-records count). With
    ``wait_started`` the server listens only once it has started (or after that many seconds):
    one of several on a shared port, whose siblings answer meanwhile, answers no request
    ``notReady``."""
    openapi = openapi_document(page_paths())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        database = store or build_store(settings)
        real_windows = None if windows is not None else build_windows(settings)
        deployer = Deployer(
            store=database,
            leases=database,
            sessions=database,
            windows=windows or real_windows or build_windows(settings),
            backend=backend or build_backend(settings),
            proxy=proxy or ProxyClient(api_url=settings.proxy.api_url, token=settings.proxy.token),
            options=options(settings, keeper_interval=keeper_interval),
            collectors=collectors,
        )
        await deployer.start()
        if wait_started:
            await deployer.started(seconds=wait_started)
        console = Console.create(settings, deployer)
        try:
            yield {
                "deployer": deployer,
                "edge": settings.http,
                "status_answers": StatusAnswers(),
                "event_streams": EventStreams(per_client=settings.deploy.per_client_event_streams),
                "console": console,
                "openapi": openapi,
            }
        finally:
            await console.aclose()
            await deployer.stop()
            if real_windows is not None:
                real_windows.close()

    return Starlette(
        routes=[*API_ROUTES, *WEB_ROUTES],
        # one table; a BinderError's type is the original binder client's name where it knows one
        exception_handlers={**EXCEPTION_HANDLERS, BinderError: error_handler},
        lifespan=lifespan,
        middleware=[
            Middleware(
                CallerMiddleware,
                api_key=settings.api_key,
                trusted_proxies=settings.deploy.trusted_proxies,
            ),
            Middleware(AccessLog),  # inside: it names the caller
        ],
    )


async def stop_apps(settings: Settings) -> int:
    """Stop every app of the backend on this host; their records become ``deleted``."""
    backend = build_backend(settings)
    store = build_store(settings)

    async def ignore(_: object) -> None:
        return None

    await backend.open(ignore)
    try:
        objects = await backend.list()
        at_once = anyio.Semaphore(STOP_AT_ONCE)

        async def stop(obs: Observed) -> None:
            async with at_once:
                with contextlib.suppress(BinderError):
                    change = Change(reason="stopped with the suite", ended_at=now())
                    await store.move(obs.id, Status.DELETED, change)
                await backend.stop(obs.id, obs.ref)

        async with anyio.create_task_group() as stops:  # each app's grace runs alongside
            for obs in objects:
                stops.start_soon(stop, obs)
    finally:
        await backend.close()
        await store.close()
    if settings.deploy.backend == "local" and settings.deploy.local.sandbox:
        from services.deploy_kubernetes.backends.local.sandboxed import SandboxedBackend

        assert isinstance(backend, SandboxedBackend)
        await backend.retire()  # nothing of the sandbox is left on the host
    return len(objects)
