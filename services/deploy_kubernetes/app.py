"""``create_app``: the deploy server as a Starlette application (run by uvicorn with --factory)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client.registry import Collector
from starlette.applications import Starlette

from common.errors import ConfigError
from common.proxy import Proxy, ProxyClient
from common.settings import Settings
from common.web import EXCEPTION_HANDLERS
from services.deploy_kubernetes.backends.base import Backend, Observed
from services.deploy_kubernetes.console import Console
from services.deploy_kubernetes.deployer import Deployer
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Status, now, sources_of
from services.deploy_kubernetes.routes import ROUTES
from services.deploy_kubernetes.service import Service
from services.deploy_kubernetes.store import MongoStore, Store


def build_backend(settings: Settings) -> Backend:
    """The backend the settings name."""
    if settings.deploy.backend == "local":
        from services.deploy_kubernetes.backends.local import LocalBackend

        return LocalBackend(
            state_dir=settings.home / "run" / "local", log_dir=settings.home / "logs" / "apps"
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

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        deployer = Deployer(
            store=store or MongoStore(uri=settings.db.effective_uri, database=settings.db.database),
            backend=backend or build_backend(settings),
            proxy=proxy
            or ProxyClient(
                api_url=settings.proxy.api_url,
                token=settings.proxy.token,
                public_url=settings.proxy.public_url,
            ),
            metrics=Metrics(*collectors),
            public_host=settings.public_host,
            max_deployments=settings.deploy.max_deployments,
            default_cull_timeout_ms=settings.deploy.default_cull_timeout_ms,
            launch_timeout_seconds=settings.deploy.launch_timeout_seconds,
        )
        service = Service(
            deployer=deployer,
            api_key=settings.api_key,
            launch_requires_key=settings.deploy.launch_requires_key,
            templates_dir=settings.templates_dir,
            cull_interval=settings.deploy.cull_interval_seconds,
            max_age_seconds=settings.deploy.max_age_seconds,
            keeper_interval=keeper_interval,
        )
        await service.start()
        console = Console.create(settings, service)
        try:
            yield {"service": service, "console": console}
        finally:
            await console.aclose()
            await service.stop()

    return Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)


async def stop_apps(settings: Settings) -> int:
    """Stop every app of the backend on this host; their records become ``deleted``."""
    backend = build_backend(settings)
    store = MongoStore(uri=settings.db.effective_uri, database=settings.db.database)

    async def ignore(_: Observed) -> None:
        return None

    await backend.open(ignore)
    try:
        objects = await backend.list()
        for obs in objects:
            with contextlib.suppress(BinderError):
                await store.transition(
                    obs.id,
                    sources_of(Status.DELETED),
                    Status.DELETED,
                    reason="stopped with the suite",
                    ended_at=now(),
                )
            await backend.stop(obs.id, obs.ref)
        return len(objects)
    finally:
        await backend.close()
        await store.close()
