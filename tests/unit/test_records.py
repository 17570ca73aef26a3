"""Records: a launch whose insert landed but answered a duplicate key (the driver retried a write
whose answer was lost) is the launch's own record, not a conflict."""

from __future__ import annotations

import anyio
import pytest
from fakes import FakeStore

from services.deploy_kubernetes.errors import ConflictError
from services.deploy_kubernetes.metrics import Metrics
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.records import Records


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
