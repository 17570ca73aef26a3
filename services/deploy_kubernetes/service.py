"""The running deploy server: its parts, wired together, and its background loops, supervised.

Routes talk to :class:`Service` only; each part owns one job: :class:`Records` the deployment
state, :class:`Catalog` the templates, :class:`Launcher` launches, :class:`Ender` deletes and
failures, :class:`Keeper` the dependencies' health, :class:`Culler` and :class:`Pools` their loops.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import anyio
from loguru import logger

from common.background import Supervisor
from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend, Observed, State
from services.deploy_kubernetes.catalog import Catalog
from services.deploy_kubernetes.culler import Culler
from services.deploy_kubernetes.ending import Ender, Launches
from services.deploy_kubernetes.errors import BinderError, MalformedRequestError, NoRecordError
from services.deploy_kubernetes.keeper import Keeper
from services.deploy_kubernetes.launcher import Launcher
from services.deploy_kubernetes.limits import ClientLimits
from services.deploy_kubernetes.metrics import BackendCalls, Metrics
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    Template,
    check_id,
    check_name,
    parse_template,
)
from services.deploy_kubernetes.pools import Pools
from services.deploy_kubernetes.reconcile import Reconciler
from services.deploy_kubernetes.records import Records, Update
from services.deploy_kubernetes.store import Store

RETRY_SECONDS = 1.0


def read_template_files(folder: Path) -> list[Template]:
    """Templates from ``folder/*.toml``; a bad file is reported and skipped."""
    out = []
    for path in sorted(folder.glob("*.toml")):
        try:
            with open(path, "rb") as fh:
                out.append(parse_template(tomllib.load(fh)))
        except (OSError, tomllib.TOMLDecodeError, MalformedRequestError) as exc:
            logger.error("template file {} skipped: {}", path, exc)
    return out


@dataclass(frozen=True)
class Options:
    """What the deploy server's parts are told by the settings."""

    api_key: str
    launch_requires_key: bool
    templates_dir: Path
    public_host: str
    max_deployments: int
    default_cull_timeout_ms: int
    launch_timeout_seconds: float
    cull_interval: float
    max_age_seconds: float
    keeper_interval: float = 2.0


class Service:
    def __init__(
        self,
        *,
        store: Store,
        backend: Backend,
        proxy: Proxy,
        metrics: Metrics,
        options: Options,
        client_limits: ClientLimits,
    ) -> None:
        self.options = options
        self.api_key = options.api_key
        self.launch_requires_key = options.launch_requires_key
        self.metrics = metrics
        self.backend = backend
        self._proxy = proxy
        metrics.registry.register(BackendCalls(lambda: dict(backend.api_calls)))
        changed = asyncio.Event()
        launches = Launches()
        self.client_limits = client_limits
        self.records = Records(
            store=store,
            metrics=metrics,
            max_deployments=options.max_deployments,
            on_end=client_limits.note_end,
        )
        self.catalog = Catalog(store=store, changed=changed)
        self.ender = Ender(
            records=self.records,
            backend=backend,
            proxy=proxy,
            launches=launches,
            metrics=metrics,
            changed=changed,
        )
        self.launcher = Launcher(
            records=self.records,
            catalog=self.catalog,
            backend=backend,
            proxy=proxy,
            ender=self.ender,
            launches=launches,
            metrics=metrics,
            changed=changed,
            public_host=options.public_host,
            default_cull_timeout_ms=options.default_cull_timeout_ms,
            launch_timeout_seconds=options.launch_timeout_seconds,
        )
        self.pools = Pools(
            records=self.records,
            catalog=self.catalog,
            launcher=self.launcher,
            ender=self.ender,
            metrics=metrics,
            changed=changed,
        )
        self.culler = Culler(
            records=self.records,
            proxy=proxy,
            ender=self.ender,
            metrics=metrics,
            interval=options.cull_interval,
            max_age_seconds=options.max_age_seconds,
        )
        self.keeper = Keeper(
            records=self.records,
            backend=backend,
            proxy=proxy,
            launcher=self.launcher,
            ender=self.ender,
            metrics=metrics,
            interval=options.keeper_interval,
        )
        self._launches = launches
        self.ready = False
        self.supervisor = Supervisor(
            on_crash=lambda name: metrics.loop_crashes.labels(loop=name).inc()
        )

    # --- what routes use ----------------------------------------------------------------------

    async def get(self, template: str, dep_id: str) -> Deployment:
        check_name(template)
        check_id(dep_id)
        dep = await self.records.get(dep_id)
        if dep is None or dep.template != template or dep.pooled:
            raise NoRecordError(f"no deployment {dep_id} of template {template}")
        return dep

    async def watch(
        self, template: str, dep_id: str, *, idle_seconds: float | None = None
    ) -> AsyncGenerator[Update | None, None]:
        await self.get(template, dep_id)
        async for update in self.records.watch(dep_id, idle_seconds=idle_seconds):
            yield update

    async def delete(
        self, template: str, dep_id: str, *, reason: str = "deleted by request"
    ) -> Deployment:
        return await self.ender.delete(await self.get(template, dep_id), reason)

    def health(self) -> dict[str, str]:
        return {
            **self.keeper.health(),
            **self.supervisor.health(),
            "reconciled": "ok" if self.ready else "pending",
        }

    async def check_launchable(self) -> None:
        """Refuse a launch at once (503) while the backend or the proxy is down.

        The keeper's last look decides while it is good; a bad one is looked at again right
        away, so a component that has just come back is not refused on stale news."""
        state = self.keeper.health()
        if state["backend"] not in ("ok", "unknown"):
            await self.backend.ping()  # raises BadBackendError while it is still down
            self.keeper.mark("backend", "ok")
        if state["proxy"] not in ("ok", "unknown"):
            await self._proxy.ping()  # raises BadProxyError while it is still down
            self.keeper.mark("proxy", "ok")

    # --- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.backend.open(self.on_backend_event)
        for name, loop in self.backend.loops().items():
            self.supervisor.run(f"backend:{name}", loop)
        self.supervisor.spawn(self._start_when_reachable())

    async def _start_when_reachable(self) -> None:
        """Seed templates and reconcile once the database and proxy answer, then run the loops."""
        reconciler = Reconciler(
            self.records, self.catalog, self.backend, self._proxy, self.launcher, self.ender
        )
        while True:
            try:
                live = await self.records.open()
                self.client_limits.seed(d for d in live if not d.pooled)
                await self.catalog.load(read_template_files(self.options.templates_dir))
                await reconciler.run(live)
                break
            except BinderError as exc:
                logger.warning("waiting for the database and proxy: {}", exc.message)
            except Exception as exc:  # reconcile must not die: log it, look again
                logger.opt(exception=exc).error("start-up reconcile failed; trying again")
            await self.keeper.check_once()
            await anyio.sleep(RETRY_SECONDS)
        self.ready = True
        await self.keeper.check_once()
        self.supervisor.run("keeper", self.keeper.run)
        self.supervisor.run("culler", self.culler.run)
        self.supervisor.run("pools", self.pools.run)
        logger.info("deploy server ready with {} templates", len(self.catalog.all()))

    async def stop(self) -> None:
        await self.supervisor.cancel_all()
        await self._launches.cancel_all()
        await self.backend.close()
        await self._proxy.aclose()
        await self.records.close()

    # --- what backends tell ---------------------------------------------------------------------

    async def on_backend_event(self, observed: Observed) -> None:
        """A backend object exited or vanished on its own, or reports a launch's progress."""
        if observed.state is not State.EXITED:
            if observed.event:
                self.records.progress(observed.id, observed.event)
            return
        dep = await self.records.get(observed.id)
        if dep is None or dep.status.final:
            await self.backend.stop(observed.id, observed.ref)
            return
        if dep.status is Status.DEPLOYING and self.launcher.running(dep.id):
            return  # the launch task sees the exit and fails with its reason
        await self.ender.fail(dep, observed.reason or "the app stopped")

    async def start_preload(self, template: Template) -> None:
        await self.backend.preload(template)

    async def preload_status(self, template: Template) -> str:
        return await self.backend.preload_status(template)
