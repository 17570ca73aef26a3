"""Each host's proxy carries every route: the host's route keeper (one server of the host, holding
the host's ``routes`` lease) adds the route of every deployment that becomes ``deployed`` on any
server and removes it when the deployment ends, as the change stream tells, and puts every route
back after the proxy restarted.

The proxy keeps routes in memory only, and anyone with its token may change them. Each round the
keeper lists the proxy's routes (one request: about 1 ms for 100 routes and 2 ms of the proxy's
CPU for 1,000, measured) and holds them to what it knows of the active deployments of every
server, without a database read: a deployed app's route that points elsewhere (hijacked) is
pointed back, one that is missing is added, and a route no active deployment owns is removed
(after a fresh read of its record: another server's launch may be under way). A launch's route
is left alone until it is deployed. The proxy's default route (``/``, its ``--default-target``:
the deploy server's pages and the page of a session that ended) is held to the deploy server
where the proxy has one: one that points elsewhere (it would catch every path no app's route
takes) is pointed back. A sentinel route of the keeper's own tells when the proxy
has started afresh: then the active deployments are read from the database and every route put
back at once.
"""

from __future__ import annotations

import asyncio

import anyio
from loguru import logger

from common.proxy import Proxy, ProxyRoute
from services.deploy_kubernetes.engine.ending import Ender
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import ID_RE, Deployment, Status
from services.deploy_kubernetes.store.base import ACTIVE

SENTINEL_ROUTE = "/_binder-keeper"
SENTINEL_TARGET = "http://127.0.0.1:9"
"""Where the sentinel route points: nothing listens there (the discard port)."""
DEFAULT_ROUTE = "/"
LOOK_EVERY_SECONDS = 2.0


class RouteKeeper:
    def __init__(
        self,
        *,
        records: Records,
        proxy: Proxy,
        ender: Ender,
        interval: float = LOOK_EVERY_SECONDS,
        pages_target: str = "",
    ) -> None:
        """``pages_target``: where the proxy's default route must point (the deploy server), or
        empty, and then a default route belongs to nobody and is removed."""
        self.interval = interval
        self._pages_target = pages_target
        self._records = records
        self._proxy = proxy
        self._ender = ender
        self._changes: asyncio.Queue[Deployment] = asyncio.Queue()
        self._listening = False
        self.fresh = True
        """True until the routes of deployed apps are known to be in the proxy."""

    def _changed(self, dep: Deployment) -> None:
        if self._listening and (dep.status.final or dep.status is Status.DEPLOYED):
            self._changes.put_nowait(dep)

    async def run(self) -> None:
        """The host's loop: follow the changes, and look at the proxy every few seconds."""
        if not self._listening:
            self._records.listen(self._changed)
        self._listening = True
        self.fresh = True
        self._changes = asyncio.Queue()
        try:
            while True:
                try:
                    await self.look()
                except BinderError as exc:
                    logger.warning("route keeping skipped: {}", exc.message)
                with anyio.move_on_after(self.interval):
                    while True:
                        await self._apply(await self._changes.get())
        finally:
            self._listening = False

    async def _apply(self, dep: Deployment) -> None:
        try:
            if dep.status.final:
                await self._proxy.remove_route(dep.route)
            elif (
                dep.target
                and not self._ender.ending(dep.id)
                and await self._proxy.route(dep.route) != dep.target
            ):
                await self._proxy.add_route(dep.route, dep.target)
        except BinderError as exc:  # the next look puts it right
            logger.bind(id=dep.id).warning("route not kept: {}", exc.message)
            self.fresh = True

    async def look(self) -> None:
        """List the proxy's routes; put them all back when the sentinel is gone (or after a
        failure), else hold them to the records."""
        routes = await self._proxy.routes()
        if SENTINEL_ROUTE not in routes:
            await self._proxy.add_route(SENTINEL_ROUTE, SENTINEL_TARGET)
            self.fresh = True
        if self.fresh:
            await self.restore()
            self.fresh = False
        else:
            await self._hold(routes)

    async def _hold(self, routes: dict[str, ProxyRoute]) -> None:
        """Point back, add or remove what differs from the active deployments (see above)."""
        owners = {dep.route: dep for dep in self._records.active()}
        for path, route in routes.items():
            dep = owners.get(path)
            if path == SENTINEL_ROUTE or (dep is not None and dep.status is Status.DEPLOYING):
                continue
            if path == DEFAULT_ROUTE and self._pages_target:
                if route.target != self._pages_target:
                    logger.warning(
                        "the proxy's default route pointed at {} instead of the deploy server: "
                        "pointed back",
                        route.target,
                    )
                    await self._proxy.add_route(path, self._pages_target)
                continue
            if dep is None:
                await self._remove_stray(path, route)
            elif dep.target and route.target != dep.target and not self._ender.ending(dep.id):
                logger.bind(id=dep.id).warning(
                    "route {} pointed at {} instead of its app: pointed back", path, route.target
                )
                await self._proxy.add_route(path, dep.target)
        for path, dep in owners.items():
            if (
                path not in routes
                and dep.status is Status.DEPLOYED
                and dep.target
                and not self._ender.ending(dep.id)
            ):
                logger.bind(id=dep.id).warning("route {} missing in the proxy: added again", path)
                await self._proxy.add_route(path, dep.target)

    async def _remove_stray(self, path: str, route: ProxyRoute) -> None:
        """Remove a route that no active deployment owns, unless its record (read afresh) is
        active after all: one written since this server last looked (a launch elsewhere)."""
        dep_id = path.removeprefix("/user/")
        if path.startswith("/user/") and ID_RE.match(dep_id):
            dep = await self._records.get(dep_id)
            if dep is not None and not dep.status.final:
                return
        logger.warning("route {} to {} belongs to no deployment: removed", path, route.target)
        await self._proxy.remove_route(path)

    async def restore(self) -> None:
        active = await self._records.find(statuses=ACTIVE, pooled=None)
        targets = {path: route.target for path, route in (await self._proxy.routes()).items()}
        for dep in active:
            if (
                dep.status is Status.DEPLOYED
                and dep.target
                and not self._ender.ending(dep.id)
                and targets.get(dep.route) != dep.target
            ):
                logger.bind(id=dep.id).info("route missing in the proxy; adding it again")
                await self._proxy.add_route(dep.route, dep.target)
