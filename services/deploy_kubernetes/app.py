"""``create_app``: the deploy server as a Starlette application (run by uvicorn with --factory)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware

from common.errors import ConfigError
from common.proxy import Proxy, ProxyClient
from common.settings import Settings
from common.web import EXCEPTION_HANDLERS
from services.deploy_kubernetes.access import AccessLog
from services.deploy_kubernetes.answers import StatusAnswers
from services.deploy_kubernetes.backends.base import Backend
from services.deploy_kubernetes.console import Console
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.limits import ClientLimits
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Status, now
from services.deploy_kubernetes.routes import ROUTES
from services.deploy_kubernetes.service import Options, Service
from services.deploy_kubernetes.store import Change, MongoStore, Store


def build_backend(settings: Settings) -> Backend:
    """The backend the settings name."""
    if settings.deploy.backend == "local":
        from services.deploy_kubernetes.backends.local import (
            LocalBackend,
            app_user,
            workdir_root,
        )

        return LocalBackend(
            state_dir=settings.home / "run" / "local",
            log_dir=settings.home / "logs" / "apps",
            user=app_user(settings.deploy.local),
            workdirs=workdir_root(settings.deploy.local),
            home=settings.home,
            record_delay=settings.deploy.fault_record_delay_seconds,
        )
    if settings.deploy.backend == "docker":
        from services.deploy_kubernetes.backends.docker import DockerBackend

        return DockerBackend(
            host=settings.deploy.docker.host, suite=settings.deploy.docker.suite_label
        )
    if settings.deploy.backend == "kubernetes":
        from services.deploy_kubernetes.backends.kubernetes import KubernetesBackend

        k = settings.deploy.kubernetes
        return KubernetesBackend(
            kubeconfig=k.kubeconfig, namespace=k.namespace, suite=k.suite_label
        )
    raise ConfigError(f"backend {settings.deploy.backend!r} is not available in this build")


def build_store(settings: Settings) -> MongoStore:
    return MongoStore(uri=settings.db.effective_uri, database=settings.db.database)


def options(settings: Settings, *, keeper_interval: float = 2.0) -> Options:
    d = settings.deploy
    return Options(
        api_key=settings.api_key,
        launch_requires_key=d.launch_requires_key,
        templates_dir=settings.templates_dir,
        public_host=settings.public_host,
        max_deployments=d.max_deployments,
        default_cull_timeout_ms=d.default_cull_timeout_ms,
        launch_timeout_seconds=d.launch_timeout_seconds,
        cull_interval=d.cull_interval_seconds,
        max_age_seconds=d.max_age_seconds,
        keeper_interval=keeper_interval,
    )


def create_app(
    settings: Settings,
    *,
    backend: Backend | None = None,
    store: Store | None = None,
    proxy: Proxy | None = None,
    keeper_interval: float = 2.0,
    collectors: tuple[Collector, ...] = (),
) -> Starlette:
    """The deploy API; ``backend``, ``store`` and ``proxy`` default to the configured real ones.

    ``collectors`` are added to its /metrics (the log sink's dropped-records count)."""
    client_limits = ClientLimits(
        max_deployments=settings.deploy.per_client_max_deployments,
        launches_per_minute=settings.deploy.per_client_launches_per_minute,
        trusted_proxies=settings.deploy.trusted_proxies,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        service = Service(
            store=store or build_store(settings),
            backend=backend or build_backend(settings),
            proxy=proxy
            or ProxyClient(
                api_url=settings.proxy.api_url,
                token=settings.proxy.token,
                public_url=settings.proxy.public_url,
            ),
            metrics=Metrics(*collectors, client_limits.collector()),
            options=options(settings, keeper_interval=keeper_interval),
            client_limits=client_limits,
        )
        await service.start()
        console = Console.create(settings, service)
        try:
            yield {
                "service": service,
                "client_limits": client_limits,
                "edge": settings.http,
                "status_answers": StatusAnswers(),
                "console": console,
            }
        finally:
            await console.aclose()
            await service.stop()

    return Starlette(
        routes=ROUTES,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        middleware=[Middleware(AccessLog, client_of=client_limits.client_of)],
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
        for obs in objects:
            with contextlib.suppress(BinderError):
                change = Change(reason="stopped with the suite", ended_at=now())
                await store.move(obs.id, Status.DELETED, change)
            await backend.stop(obs.id, obs.ref)
        return len(objects)
    finally:
        await backend.close()
        await store.close()
