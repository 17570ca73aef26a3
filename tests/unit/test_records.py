"""Records: a launch whose insert landed but answered a duplicate key (the driver retried a write
whose answer was lost) is the launch's own record, not a conflict; a write answered late never
takes the view of a record back."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from fakes import FakeStore

from services.deploy_kubernetes.errors import ConflictError
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.records import Records
from services.deploy_kubernetes.store import Change


def _dep() -> Deployment:
    return Deployment(
        id=new_id(), template="t", status=Status.DEPLOYING, created=now(), cull_timeout_ms=1
    )


def test_a_retried_insert_that_landed_is_a_success() -> None:
    async def main() -> None:
        store = FakeStore()
        records = Records(store=store, metrics=Metrics(), max_deployments=5)
        await records.open()
        store.retried_inserts = 1
        dep = _dep()
        await records.create(dep)
        assert await records.get(dep.id) == dep
        assert records.active_count() == 1

    anyio.run(main)


def test_a_real_duplicate_is_still_a_conflict_and_frees_its_slot() -> None:
    async def main() -> None:
        store = FakeStore()
        records = Records(store=store, metrics=Metrics(), max_deployments=5)
        await records.open()
        dep = _dep()
        await records.create(dep)
        other = dep.evolve(template="u")  # same id, another record
        with pytest.raises(ConflictError):
            await records.create(other)
        assert records.active_count() == 1

    anyio.run(main)


async def _answered_after_a_delete(records: Records, store: FakeStore, write: Any) -> Any:
    """Run ``write`` so that it lands, then a delete lands and is answered, then ``write``'s
    own answer arrives."""
    slow = asyncio.Event()
    store.paused = slow
    task = asyncio.ensure_future(write)
    await store.landed.wait()
    store.paused = None
    dep_id = next(iter(store.deps))
    deleted = await records.move(store.deps[dep_id], Status.DELETED, Change(reason="bye"))
    assert deleted is not None
    slow.set()
    return await task


@pytest.mark.parametrize("late", ["update", "move"])
def test_a_write_answered_after_a_delete_never_shows_the_record_alive_again(late: str) -> None:
    async def main() -> None:
        store = FakeStore()
        records = Records(store=store, metrics=Metrics(), max_deployments=5)
        await records.open()
        dep = _dep()
        await records.create(dep)
        if late == "update":  # the culler's look at a deployed app's activity
            deployed = await records.move(dep, Status.DEPLOYED, Change(target="http://a:1"))
            assert deployed is not None
            write = records.update(dep.id, Change(last_activity=now()))
        else:  # a launch's move to deployed, answered after the delete
            write = records.move(dep, Status.DEPLOYED, Change(target="http://a:1"))
        answer = await _answered_after_a_delete(records, store, write)
        shown = await records.get(dep.id)
        assert shown is not None
        assert shown.status is Status.DELETED
        assert records.active_count() == 0
        assert answer is None or answer.status is Status.DELETED

    anyio.run(main)
