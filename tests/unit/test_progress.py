"""Progress messages of a backend reach a deployment's watchers, the late ones included, while it
deploys: through the store's events, as they reach every server's (on Records, the owner of
deployment state, with the fake store)."""

from __future__ import annotations

import asyncio

import anyio
from fakes import FakeStore

from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.records import Progress, Records
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.store.base import Change


async def _following(store: FakeStore) -> tuple[Records, asyncio.Future[None]]:
    """Records over ``store``, following its events as a server does (cancel the future)."""
    records = Records(store=store, metrics=Metrics(), max_deployments=10)
    await records.open()

    async def follow() -> None:
        async for event in store.events():
            records.apply(event)

    following = asyncio.ensure_future(follow())
    await asyncio.sleep(0)
    return records, following


def _deploying() -> Deployment:
    return Deployment(
        id=new_id(), template="t", status=Status.DEPLOYING, created=now(), cull_timeout_ms=1
    )


def test_progress_reaches_watchers_while_deploying_and_late_ones_get_the_last_few() -> None:
    async def main() -> None:
        records, following = await _following(FakeStore())
        dep = _deploying()
        await records.admit(dep)
        early = records.watch(dep.id)
        assert (await anext(early)) == dep
        await records.progress(dep.id, "Pulling: x")
        assert await anext(early) == Progress(dep.id, "Pulling: x")

        late = records.watch(dep.id)
        assert (await anext(late)) == dep
        assert await anext(late) == Progress(dep.id, "Pulling: x")

        await records.move(dep, Status.DEPLOYED, Change())
        assert isinstance(await anext(late), Deployment)
        await records.progress(dep.id, "Unhealthy: y")  # not told once deployed
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
        following.cancel()

    async def bounded() -> None:
        with anyio.fail_after(5):  # a message that never comes fails rather than hangs
            await main()

    anyio.run(bounded)


def test_progress_told_while_the_record_is_written_reaches_its_watchers() -> None:
    """A launch's object is made while its record is written: on Kubernetes the pod's
    Scheduled event comes within milliseconds, before the write lands; it is told once the
    record is admitted, not dropped."""

    async def main() -> None:
        store = FakeStore()
        store.insert_delay = 0.05
        records, following = await _following(store)
        dep = _deploying()
        admitting = asyncio.ensure_future(records.admit(dep))
        await asyncio.sleep(0.01)  # the write is under way
        await records.progress(dep.id, "Scheduled: on the node")
        await admitting
        watching = records.watch(dep.id)
        assert (await anext(watching)) == dep
        assert await anext(watching) == Progress(dep.id, "Scheduled: on the node")
        await watching.aclose()
        following.cancel()

    async def bounded() -> None:
        with anyio.fail_after(5):
            await main()

    anyio.run(bounded)
