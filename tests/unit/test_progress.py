"""Progress messages of a backend reach a deployment's watchers, the late ones included, while it
deploys (on the Deployer, with fakes of the store, backend and proxy)."""

from __future__ import annotations

import anyio
from fakes import FakeBackend, FakeProxy, FakeStore

from services.deploy_kubernetes.backends.base import Observed, State
from services.deploy_kubernetes.deployer import Deployer
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status, Template, new_id, now


def _deployer() -> Deployer:
    return Deployer(
        store=FakeStore(),
        backend=FakeBackend(),
        proxy=FakeProxy(),
        metrics=Metrics(),
        public_host="hub.example",
        max_deployments=10,
        default_cull_timeout_ms=60_000,
        launch_timeout_seconds=10,
    )


def test_progress_reaches_watchers_while_deploying_and_late_ones_get_the_last_few() -> None:
    async def main() -> None:
        deployer = _deployer()
        await deployer.put_template(Template(name="t", command=("x",)))
        dep = Deployment(
            id=new_id(), template="t", status=Status.DEPLOYING, created=now(), cull_timeout_ms=1
        )
        await deployer.store.insert(dep)
        early = deployer.watch("t", dep.id)
        assert (await anext(early)).status is Status.DEPLOYING
        await deployer.on_backend_event(Observed(dep.id, State.STARTING, event="Pulling: x"))
        assert await anext(early) == "Pulling: x"

        late = deployer.watch("t", dep.id)
        assert (await anext(late)).status is Status.DEPLOYING
        assert await anext(late) == "Pulling: x"

        await deployer.move(dep, Status.DEPLOYED)
        assert isinstance(await anext(late), Deployment)
        await deployer.on_backend_event(Observed(dep.id, State.STARTING, event="Unhealthy: y"))
        after = deployer.watch("t", dep.id)
        assert (await anext(after)).status is Status.DEPLOYED
        await deployer.move(dep, Status.DELETED, reason="gone")
        final = await anext(after)  # no progress told once deployed: the next item is the end
        assert isinstance(final, Deployment)
        assert final.status is Status.DELETED
        for stream in (early, late, after):
            await stream.aclose()

    async def bounded() -> None:
        with anyio.fail_after(5):  # a message that never comes fails rather than hangs
            await main()

    anyio.run(bounded)
