"""Records: a launch whose insert landed but answered a duplicate key (the driver retried a write
whose answer was lost) is the launch's own record, not a conflict; a write answered late never
takes the view of a record back; pooled instances are handed out once each, from memory, with one
write."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from fakes import FakeStore

from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.records import Claim, Records
from services.deploy_kubernetes.errors import BadDatabaseError, ConflictError
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.store.base import Change


async def _opened() -> tuple[FakeStore, Records]:
    store = FakeStore()
    records = Records(store=store, metrics=Metrics(), max_deployments=5)
    await records.open()
    return store, records


async def _create(records: Records, dep: Deployment) -> None:
    """What a launch does: count ``dep`` in and write it, in one step."""
    await records.admit(dep)


async def _active(store: FakeStore) -> int:
    return (await store.counts()).total


def _dep() -> Deployment:
    return Deployment(
        id=new_id(), template="t", status=Status.DEPLOYING, created=now(), cull_timeout_ms=1
    )


def test_a_retried_insert_that_landed_is_a_success() -> None:
    async def main() -> None:
        store, records = await _opened()
        store.retried_inserts = 1
        dep = _dep()
        await _create(records, dep)
        assert await records.get(dep.id) == dep
        assert await _active(store) == 1

    anyio.run(main)


def test_a_real_duplicate_is_still_a_conflict_and_frees_its_slot() -> None:
    async def main() -> None:
        store, records = await _opened()
        dep = _dep()
        await _create(records, dep)
        other = dep.evolve(template="u")  # same id, another record
        with pytest.raises(ConflictError):
            await _create(records, other)
        assert await _active(store) == 1

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
        store, records = await _opened()
        dep = _dep()
        await _create(records, dep)
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
        assert await _active(store) == 0
        assert answer is None or answer.status is Status.DELETED


def _pooled(*, ready: bool = True) -> Deployment:
    return _dep().evolve(
        status=Status.DEPLOYED if ready else Status.DEPLOYING,
        pooled=True,
        deployed_at=now() if ready else None,
    )


async def _records_over(*deps: Deployment) -> tuple[FakeStore, Records]:
    store = FakeStore()
    for dep in deps:
        await store.insert(dep)
    records = Records(store=store, metrics=Metrics(), max_deployments=10)
    await records.open()
    return store, records


async def _claim(records: Records, client: str = "10.0.0.1") -> Deployment | None:
    return await records.claim_pooled("t", Claim(created=now(), cull_timeout_ms=9, client=client))


def test_concurrent_claims_hand_each_ready_instance_out_once() -> None:
    async def main() -> None:
        ready = [_pooled(), _pooled()]
        store, records = await _records_over(*ready, _pooled(ready=False))
        got: list[Deployment | None] = []

        async def claim(n: int) -> None:
            got.append(await _claim(records, f"10.0.0.{n}"))

        async with anyio.create_task_group() as tasks:
            for n in range(3):
                tasks.start_soon(claim, n)
        claimed = [d for d in got if d is not None]
        assert sorted(d.id for d in claimed) == sorted(d.id for d in ready)
        assert got.count(None) == 1, "an instance still starting is not handed out"
        for dep in claimed:  # what the launch answers is what the database holds
            assert store.deps[dep.id] == dep
            assert (dep.pooled, dep.cull_timeout_ms) == (False, 9)
        assert await _active(store) == 3, "a claim takes no more room"
        assert sum((await store.counts()).clients.values()) == 2, "each claim counts its client"

    anyio.run(main)


def test_a_claim_lost_to_another_server_takes_the_next_instance() -> None:
    async def main() -> None:
        first, second = _pooled(), _pooled()
        store, records = await _records_over(first, second)
        store.deps[first.id] = first.evolve(pooled=False, client="elsewhere")
        got = await _claim(records)
        assert got is not None
        assert got.id == second.id
        seen = records.cached(first.id)
        assert seen is not None
        assert seen.client == "elsewhere", "the view learns of the other claim"
        assert await _claim(records) is None

    anyio.run(main)


def test_a_claim_that_could_not_be_written_leaves_the_instance_claimable() -> None:
    async def main() -> None:
        dep = _pooled()
        store, records = await _records_over(dep)
        store.down = True
        with pytest.raises(BadDatabaseError):
            await _claim(records)
        store.down = False
        got = await _claim(records)
        assert got is not None
        assert got.id == dep.id

    anyio.run(main)


def test_an_instance_withdrawn_for_retirement_is_never_claimed() -> None:
    async def main() -> None:
        kept, retired, starting = _pooled(), _pooled(), _pooled(ready=False)
        _, records = await _records_over(kept, retired, starting)
        assert records.withdraw(retired)
        assert records.withdraw(starting)
        await records.move(starting, Status.DEPLOYED, Change(deployed_at=now()))
        got = await _claim(records)
        assert got is not None
        assert got.id == kept.id
        assert await _claim(records) is None, "withdrawn: neither the ready one nor the new one"
        assert not records.withdraw(got), "a claimed instance is a user's, not the pool's"

    anyio.run(main)
