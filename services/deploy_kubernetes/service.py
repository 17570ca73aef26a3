"""The running deploy server: its deployer and background loops, started and stopped together."""

from __future__ import annotations

import tomllib
from pathlib import Path

import anyio
from loguru import logger

from common.background import Background
from services.deploy_kubernetes.culler import Culler, Keeper
from services.deploy_kubernetes.deployer import Deployer
from services.deploy_kubernetes.errors import BinderError, MalformedRequestError
from services.deploy_kubernetes.models import Status, Template, parse_template
from services.deploy_kubernetes.pools import Pools
from services.deploy_kubernetes.reconcile import reconcile

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


class Service:
    def __init__(
        self,
        *,
        deployer: Deployer,
        api_key: str,
        launch_requires_key: bool,
        templates_dir: Path,
        cull_interval: float,
        max_age_seconds: float,
        keeper_interval: float = 2.0,
    ) -> None:
        self.deployer = deployer
        self.api_key = api_key
        self.launch_requires_key = launch_requires_key
        self.templates_dir = templates_dir
        self.pools = Pools(deployer)
        self.culler = Culler(deployer, interval=cull_interval, max_age_seconds=max_age_seconds)
        self.keeper = Keeper(deployer, interval=keeper_interval)
        self.ready = False
        self._background = Background()

    def health(self) -> dict[str, str]:
        return {**self.keeper.healthy, "reconciled": "ok" if self.ready else "pending"}

    async def check_launchable(self) -> None:
        """Refuse a launch at once (503) while the backend or the proxy is down.

        The keeper's last look decides while it is good; a bad one is looked at again right
        away, so a component that has just come back is not refused on stale news."""
        d, state = self.deployer, self.keeper.healthy
        if state["backend"] not in ("ok", "unknown"):
            await d.backend.ping()  # raises BadBackendError while it is still down
            state["backend"] = "ok"
        if state["proxy"] not in ("ok", "unknown"):
            await d.proxy.ping()  # raises BadProxyError while it is still down
            state["proxy"] = "ok"

    async def start(self) -> None:
        await self.deployer.backend.open(self.deployer.on_backend_event)
        self._background.spawn(self._start_when_reachable())

    async def _start_when_reachable(self) -> None:
        """Seed templates and reconcile once the database and proxy answer, then run the loops."""
        while True:
            try:
                await self.deployer.store.open()
                for template in read_template_files(self.templates_dir):
                    await self.deployer.store.put_template(template)
                await self.deployer.load_templates()
                await reconcile(self.deployer)
                if self.deployer.client_limits is not None:  # per-client limits: seed the counts
                    active = [Status.DEPLOYING, Status.DEPLOYED]
                    self.deployer.client_limits.seed(
                        await self.deployer.store.find(statuses=active)
                    )
                break
            except BinderError as exc:
                logger.warning("waiting for the database and proxy: {}", exc.message)
                await self.keeper.check_once()
                await anyio.sleep(RETRY_SECONDS)
        self.ready = True
        await self.keeper.check_once()
        self._background.spawn(self.keeper.run())
        self._background.spawn(self.culler.run())
        self._background.spawn(self.pools.run())
        logger.info("deploy server ready with {} templates", len(self.deployer.templates))

    async def stop(self) -> None:
        await self._background.cancel_all()
        await self.deployer.close()
        await self.deployer.backend.close()
        await self.deployer.proxy.aclose()
        await self.deployer.store.close()

    async def start_preload(self, template: Template) -> None:
        await self.deployer.backend.preload(template)

    async def preload_status(self, template: Template) -> str:
        return await self.deployer.backend.preload_status(template)
