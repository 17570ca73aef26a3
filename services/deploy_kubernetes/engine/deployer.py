"""The running deploy server: its parts, wired together, its use cases, and its background loops,
supervised.

The front ends (the JSON API and the web pages) call :class:`Deployer`'s use-case methods only,
never its parts; each part owns one job: :class:`Records` the deployment state, :class:`Catalog`
the templates, :class:`Launcher` launches (with the per-client limits of :class:`ClientLimits`
beside the capacity), :class:`Ender` deletes and failures, :class:`Keeper` the dependencies'
health, :class:`Culler`, :class:`Pools`, :class:`Reconciler` and :class:`History` the leader's
loops, :class:`RouteKeeper` the host's proxy.

Several servers (processes of one host, and hosts) share one database. Each server follows every
server's writes (:meth:`Deployer.follow`) and beats; what must run once runs on the holder of the
``leader`` lease, and what each host's proxy needs on the holder of that host's ``routes`` lease
(:class:`Leadership`).
"""

from __future__ import annotations

import asyncio
import hashlib
import tomllib
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
from loguru import logger
from prometheus_client.registry import Collector

from common.background import LoopSupervisor
from common.proxy import Proxy
from services.deploy_kubernetes.backends.base import Backend, Observed, State
from services.deploy_kubernetes.engine.catalog import Catalog
from services.deploy_kubernetes.engine.culler import Culler
from services.deploy_kubernetes.engine.ending import Ender
from services.deploy_kubernetes.engine.history import History
from services.deploy_kubernetes.engine.keeper import Keeper
from services.deploy_kubernetes.engine.launcher import Launcher
from services.deploy_kubernetes.engine.launches import Launches
from services.deploy_kubernetes.engine.leadership import Leadership
from services.deploy_kubernetes.engine.limits import Caller, ClientLimits
from services.deploy_kubernetes.engine.metrics import BackendCalls, LeasesHeld, Metrics
from services.deploy_kubernetes.engine.output import AppOutput, Output
from services.deploy_kubernetes.engine.pools import Pools
from services.deploy_kubernetes.engine.reconcile import Reconciler
from services.deploy_kubernetes.engine.records import Records, Update
from services.deploy_kubernetes.engine.routes import RouteKeeper
from services.deploy_kubernetes.errors import BinderError, MalformedRequestError, NoRecordError
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    Template,
    check_id,
    check_name,
    is_id,
    new_id,
    now,
    parse_status,
    parse_template,
)
from services.deploy_kubernetes.store.base import (
    Leases,
    Page,
    Search,
    Sessions,
    Store,
    Windows,
)

RETRY_SECONDS = 1.0
OUTPUT_LOOK_SECONDS = 1.0
"""How often a launch page following an app's output has it looked at while the app starts."""
BEAT_SECONDS = 1.0
LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000


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


@dataclass(frozen=True, kw_only=True)
class Options:
    """What the deploy server's parts are told by the settings."""

    launch_requires_key: bool
    templates_dir: Path
    public_host: str
    public_url: str
    """Where users reach the proxy (``scheme://host[:port]``): the base of ``url`` and links."""
    pages_target: str = ""
    """Where the proxy's default route points (this server, which serves the pages behind it)."""
    max_deployments: int
    per_client_max_deployments: int
    per_client_launches_per_minute: int
    default_cull_timeout_ms: int
    launch_timeout_seconds: float
    cull_interval: float
    max_age_seconds: float
    keeper_interval: float = 2.0
    lease_seconds: float = 5.0
    """The leases' length: another server takes over this long after a holder stops."""
    history_days: float = 30.0
    host: str = "localhost"
    """What names this host (and its proxy) among the hosts sharing the database."""


class Deployer:
    def __init__(
        self,
        *,
        store: Store,
        leases: Leases,
        sessions: Sessions,
        windows: Windows,
        backend: Backend,
        proxy: Proxy,
        options: Options,
        collectors: Iterable[Collector] = (),
    ) -> None:
        """``collectors`` are added to the metrics (the log sink's dropped-records count)."""
        self._options = options
        self._store = store
        self._leases = leases
        self._sessions = sessions
        self._backend = backend
        self._proxy = proxy
        self.server = f"{options.host}/{new_id()[:12]}"
        """This server's id among all (a new one at each start)."""
        self._client_limits = ClientLimits(
            max_deployments=options.per_client_max_deployments,
            launches_per_minute=options.per_client_launches_per_minute,
            windows=windows,
        )
        metrics = Metrics(*collectors, self._client_limits.collector())
        metrics.registry.register(BackendCalls(lambda: dict(backend.api_calls)))
        self._metrics = metrics
        changed = asyncio.Event()
        launches = Launches()
        self._records = Records(
            store=store,
            metrics=metrics,
            max_deployments=options.max_deployments,
        )
        self._catalog = Catalog(store=store, changed=changed)
        self._output = AppOutput(backend=backend)
        self._ender = Ender(
            records=self._records,
            backend=backend,
            output=self._output,
            proxy=proxy,
            launches=launches,
            metrics=metrics,
            changed=changed,
        )
        self._launcher = Launcher(
            records=self._records,
            catalog=self._catalog,
            backend=backend,
            proxy=proxy,
            ender=self._ender,
            launches=launches,
            client_limits=self._client_limits,
            metrics=metrics,
            changed=changed,
            public_host=options.public_host,
            public_url=options.public_url,
            default_cull_timeout_ms=options.default_cull_timeout_ms,
            launch_timeout_seconds=options.launch_timeout_seconds,
            server=self.server,
        )
        self._pools = Pools(
            records=self._records,
            catalog=self._catalog,
            launcher=self._launcher,
            ender=self._ender,
            metrics=metrics,
            changed=changed,
        )
        self._culler = Culler(
            records=self._records,
            catalog=self._catalog,
            proxy=proxy,
            ender=self._ender,
            metrics=metrics,
            interval=options.cull_interval,
            max_age_seconds=options.max_age_seconds,
        )
        self._keeper = Keeper(
            records=self._records,
            backend=backend,
            proxy=proxy,
            ender=self._ender,
            client_limits=self._client_limits,
            metrics=metrics,
            interval=options.keeper_interval,
        )
        self._reconciler = Reconciler(
            records=self._records,
            catalog=self._catalog,
            backend=backend,
            proxy=proxy,
            launcher=self._launcher,
            ender=self._ender,
            leases=leases,
            server=self.server,
            beat_seconds=max(3 * BEAT_SECONDS, options.lease_seconds),
        )
        self._history = History(records=self._records, days=options.history_days)
        self._routes = RouteKeeper(
            records=self._records,
            proxy=proxy,
            ender=self._ender,
            interval=options.keeper_interval,
            pages_target=options.pages_target,
        )
        self._launches = launches
        self._ready = False
        self._started = asyncio.Event()

        def crashed(name: str) -> None:
            metrics.loop_crashes.labels(loop=name).inc()

        self._supervisor = LoopSupervisor(on_crash=crashed)
        self.leader = Leadership(
            leases=leases,
            name="leader",
            holder=self.server,
            seconds=options.lease_seconds,
            loops={
                "reconcile": self._reconciler.keep,
                "culler": self._culler.run,
                "pools": self._pools.run,
                "history": self._history.run,
            },
            on_crash=crashed,
        )
        metrics.registry.register(
            LeasesHeld(lambda: {"leader": self.leader.holding, "routes": self.host_routes.holding})
        )
        host = hashlib.sha256(options.host.encode()).hexdigest()[:16]
        self.host_routes = Leadership(
            leases=leases,
            name=f"routes:{host}",
            holder=self.server,
            seconds=options.lease_seconds,
            loops={"routes": self._routes.run},
            on_crash=crashed,
        )

    # --- use cases: deployments -----------------------------------------------------------------

    def authorize_launch(self, caller: Caller) -> None:
        """Refuse (403) a launch by a caller without the key where launching needs it."""
        if self._options.launch_requires_key:
            caller.require_key()

    async def check_launchable(self) -> None:
        """Refuse a launch at once (503) while the backend or the proxy is down.

        The keeper's last look decides while it is good; a bad one is looked at again right
        away, so a component that has just come back is not refused on stale news."""
        state = self._keeper.health()
        if state["backend"] not in ("ok", "unknown"):
            await self._backend.ping()  # raises BadBackendError while it is still down
            self._keeper.mark("backend", "ok")
        if state["proxy"] not in ("ok", "unknown"):
            await self._proxy.ping()  # raises BadProxyError while it is still down
            self._keeper.mark("proxy", "ok")

    async def launch(
        self, template: str, cull_timeout_ms: int | None, *, caller: Caller, urlpath: str = ""
    ) -> Deployment:
        """Launch ``template`` for ``caller``; answers once its record is written (or at once,
        ``deployed``, with an instance from the template's pool)."""
        return await self._launcher.launch(
            template, cull_timeout_ms, caller=caller, urlpath=urlpath
        )

    async def deployment(self, template: str, dep_id: str) -> Deployment:
        """Deployment ``dep_id`` of ``template`` (404 ``noRecord`` for any other)."""
        check_name(template)
        check_id(dep_id)
        dep = await self._records.get(dep_id)
        if dep is None or dep.template != template or dep.pooled:
            raise NoRecordError(f"no deployment {dep_id} of template {template}")
        return dep

    async def deployments(
        self,
        *,
        template: str | None = None,
        status: str | None = None,
        limit: str | None = None,
        cursor: str | None = None,
    ) -> Page:
        """The deployments handed to users (pooled instances apart), oldest first, of
        ``template`` (which must exist) and in ``status`` (a status's name) when given: the
        active ones and the newest ended ones, at most ``limit`` (default 1000); older ones on
        the pages ``cursor`` names."""
        if template is not None:
            self._catalog.get(template)
        wanted = None if status is None else parse_status(status)
        return await self._records.page(
            template=template, status=wanted, limit=_limit(limit), cursor=cursor
        )

    async def watch(
        self,
        template: str,
        dep_id: str,
        *,
        idle_seconds: float | None = None,
        output: bool = False,
    ) -> AsyncGenerator[Update | Output | None, None]:
        """The deployment now, then each change and progress message until a final status;
        None after each ``idle_seconds`` without news. With ``output``, while it deploys, the
        app's last lines of output whenever they change (looked at every second)."""
        dep = await self.deployment(template, dep_id)
        if not output:
            async for update in self._records.watch(dep_id, idle_seconds=idle_seconds):
                yield update
            return
        updates = self._records.watch(dep_id, idle_seconds=OUTPUT_LOOK_SECONDS)
        keepalive = idle_seconds or float("inf")
        try:
            async for item in self._output.follow(
                dep, updates, every=OUTPUT_LOOK_SECONDS, keepalive=keepalive
            ):
                yield item
        finally:
            await updates.aclose()

    async def session(self, dep_id: str) -> Deployment | None:
        """Deployment ``dep_id`` of any template, as its ended page tells of it; None for an
        id that is not a deployment's (or is a pooled instance's)."""
        if not is_id(dep_id):
            return None
        dep = await self._records.get(dep_id)
        return None if dep is None or dep.pooled else dep

    @property
    def public_url(self) -> str:
        """Where users reach the proxy (and, through it, the pages): the base of every link."""
        return self._options.public_url.rstrip("/")

    @property
    def max_age_seconds(self) -> float:
        return self._options.max_age_seconds

    async def delete(
        self, template: str, dep_id: str, *, reason: str = "deleted by request"
    ) -> Deployment:
        return await self._ender.delete(await self.deployment(template, dep_id), reason)

    # --- use cases: templates, pools, preloading -------------------------------------------------

    def templates(self) -> list[Template]:
        """Every registered template (503 ``notReady`` until they are loaded)."""
        return self._catalog.all()

    def template(self, name: str) -> Template:
        """Template ``name`` (404 ``noTemplate`` when there is none)."""
        return self._catalog.get(name)

    async def put_template(self, template: Template) -> None:
        await self._catalog.put(template)

    async def delete_template(self, name: str) -> None:
        await self._catalog.delete(name)

    async def pool(self, template: str) -> dict[str, object]:
        """The state of ``template``'s pool: its size, instances ready and starting."""
        return await self._pools.state(template)

    async def resize_pool(self, template: str, size: int) -> dict[str, object]:
        return await self._pools.resize(template, size)

    async def preload(self, template: str, *, start: bool) -> str:
        """``template``'s image on every node: ``loading`` or ``completed``; ``start`` begins
        pulling it."""
        found = self._catalog.get(template)
        if start:
            await self._backend.preload(found)
        return await self._backend.preload_status(found)

    # --- use cases: the operators' view ------------------------------------------------------------

    def health(self) -> dict[str, str]:
        return {
            **self._keeper.health(),
            **self._supervisor.health(),
            "reconciled": "ok" if self._ready else "pending",
        }

    async def metrics_text(self) -> bytes:
        """/metrics, in Prometheus' text format; each client's deployments counted afresh."""
        try:
            self._client_limits.note_held((await self._records.counts()).clients)
        except BinderError as exc:  # the last counts are shown
            logger.warning("client counts not read for /metrics: {}", exc.message)
        return self._metrics.text()

    async def capacity(self) -> dict[str, Any]:
        """Deployments (pooled ones too) that may run at once, and those active now on every
        server, in total and per template."""
        counts = await self._records.counts()
        return {
            "max-deployments": self._records.max_deployments,
            "active": counts.total,
            "per-template": counts.templates,
        }

    async def status_counts(self) -> dict[str, int]:
        """How many records (pooled ones apart) are in each status."""
        return await self._store.status_counts()

    async def search(self, query: Search) -> tuple[list[Deployment], int]:
        """The operators' window of records (the console's table), and how many match."""
        if query.template is not None:
            check_name(query.template)
        return await self._store.search(query)

    def clients_in_use(self) -> dict[str, int]:
        """Deployments held by each client address that holds any."""
        return self._client_limits.held()

    def launch_latency(self) -> dict[str, Any]:
        """The launch-latency histogram of /metrics, by pooled or not."""
        return self._metrics.latency()

    # --- use cases: console sessions -----------------------------------------------------------

    async def open_session(self, digest: str, seconds: float) -> None:
        """Keep a console session (by its token's hash) for ``seconds``, valid on every server."""
        await self._sessions.put_session(digest, now() + timedelta(seconds=seconds))

    async def session_valid(self, digest: str) -> bool:
        return await self._sessions.session_valid(digest)

    async def end_session(self, digest: str) -> None:
        await self._sessions.end_session(digest)

    # --- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        await self._backend.open(self.on_backend_event)
        for name, loop in self._backend.loops().items():
            self._supervisor.run(f"backend:{name}", loop)
        self._supervisor.spawn(self._start_when_reachable())

    async def _start_when_reachable(self) -> None:
        """Open the records and seed the templates once the database answers, then run the
        loops: this server's, and the leases' (the leader reconciles when it begins)."""
        while True:
            try:
                await self._store.ping()
                await self._leases.beat(self.server)  # not taken for gone by a leader
                if "follow" not in self._supervisor.loops:  # once, though a later step failed
                    self._supervisor.run("follow", self.follow)
                await self._records.open()
                await self._catalog.load(read_template_files(self._options.templates_dir))
                break
            except BinderError as exc:
                logger.warning("waiting for the database: {}", exc.message)
            await self._keeper.check_once()
            await anyio.sleep(RETRY_SECONDS)
        self._ready = True
        self._started.set()
        await self._keeper.check_once()
        self._supervisor.run("keeper", self._keeper.run)
        self._supervisor.run("beat", self._beat)
        self._supervisor.run("lease:leader", self.leader.run)
        self._supervisor.run("lease:routes", self.host_routes.run)
        logger.info(
            "deploy server {} ready with {} templates", self.server, len(self._catalog.all())
        )

    async def started(self, *, seconds: float) -> bool:
        """Wait until the records are open and the templates loaded (at most ``seconds``)."""
        with anyio.move_on_after(seconds):
            await self._started.wait()
        return self._started.is_set()

    async def follow(self) -> None:
        """Every server's writes, as the change stream tells them, to this server's records
        and templates (a loop)."""
        async for event in self._store.events():
            if event.templates:
                try:
                    await self._catalog.reload()
                except BinderError as exc:
                    logger.warning("templates not read again: {}", exc.message)
            else:
                self._records.apply(event)

    async def _beat(self) -> None:
        while True:
            try:
                await self._leases.beat(self.server)
            except BinderError as exc:
                logger.warning("heartbeat not written: {}", exc.message)
            await asyncio.sleep(BEAT_SECONDS)

    async def stop(self) -> None:
        await self._supervisor.cancel_all()
        await self._launches.cancel_all()
        await self._backend.close()
        await self._proxy.aclose()
        await self._records.close()

    # --- what backends tell ---------------------------------------------------------------------

    async def on_backend_event(self, observed: Observed) -> None:
        """A backend object exited or vanished on its own, or reports a launch's progress."""
        if observed.state is not State.EXITED:
            if observed.event:
                await self._records.progress(observed.id, observed.event)
            return
        if self._launcher.running(observed.id):
            shown = self._records.cached(observed.id)
            if shown is None or shown.status is Status.DEPLOYING:
                # The launch task sees the exit and fails with its reason. Its record may not
                # be written yet (an app that exits at once is told of before its insert is
                # answered): that is no app without a record, and stopping it here would make
                # the backend forget the exit code the launch's reason is made of.
                return
        dep = await self._records.get(observed.id)
        if dep is None or dep.status.final:
            await self._backend.stop(observed.id, observed.ref)
            return
        await self._ender.fail(dep, observed.reason or "the app stopped")


def _limit(value: str | None) -> int:
    """``?limit=``: 1 to :data:`MAX_LIST_LIMIT`, :data:`LIST_LIMIT` when not given."""
    if value is None:
        return LIST_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIST_LIMIT:
        raise MalformedRequestError(f"limit: must be an integer from 1 to {MAX_LIST_LIMIT}")
    return int(value)
