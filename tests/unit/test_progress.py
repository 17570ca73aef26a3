"""Progress messages of a backend reach a deployment's watchers, the late ones included, while it
deploys (on Records, the owner of deployment state, with the fake store)."""

from __future__ import annotations

import anyio
from fakes import FakeStore

from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.records import Progress, Records
from services.deploy_kubernetes.store import Change


def test_progress_reaches_watchers_while_deploying_and_late_ones_get_the_last_few() -> None:
    async def main() -> None:
        records = Records(store=FakeStore(), metrics=Metrics(), max_deployments=10)
        await records.open()
        dep = Deployment(
            id=new_id(), template="t", status=Status.DEPLOYING, created=now(), cull_timeout_ms=1
        )
        await records.create(dep)
        early = records.watch(dep.id)
        assert (await anext(early)) == dep
        records.progress(dep.id, "Pulling: x")
        assert await anext(early) == Progress(dep.id, "Pulling: x")

        late = records.watch(dep.id)
        assert (await anext(late)) == dep
        assert await anext(late) == Progress(dep.id, "Pulling: x")

        await records.move(dep, Status.DEPLOYED, Change())
        assert isinstance(await anext(late), Deployment)
        records.progress(dep.id, "Unhealthy: y")  # not told once deployed
        after = records.watch(dep.id)
        first = await anext(after)
        assert isinstance(first, Deployment)
        assert first.status is Status.DEPLOYED
        await records.move(dep, Status.DELETED, Change(reason="gone"))
        final = await anext(after)  # no progress kept once deployed: the next item is the end
        assert isinstance(final, Deployment)
        assert final.status is Status.DELETED
        for stream in (early, late, after):
            await stream.aclose()

    async def bounded() -> None:
        with anyio.fail_after(5):  # a message that never comes fails rather than hangs
            await main()

    anyio.run(bounded)
