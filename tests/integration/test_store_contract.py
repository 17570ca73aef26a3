"""One suite over every implementation of the ``Store`` port: the real MongoDB store on the real
database server, and the fake the unit tests use, so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import anyio
import pytest
from fakes import FakeStore
from harness import Database

from services.deploy_kubernetes.errors import ConflictError
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    Template,
    new_id,
    now,
    parse_template,
)
from services.deploy_kubernetes.store.base import ACTIVE, Change, Store
from services.deploy_kubernetes.store.mongo import MongoStore

pytestmark = pytest.mark.integration


def _mongo(database: Database) -> Store:
    return MongoStore(uri=database.uri, database=f"contract{secrets.token_hex(4)}")


def _fake(database: Database) -> Store:
    return FakeStore()


@pytest.fixture(params=[_mongo, _fake], ids=["mongo", "fake"])
def make_store(request: pytest.FixtureRequest, database: Database) -> Callable[[], Store]:
    factory: Callable[[Database], Store] = request.param
    return lambda: factory(database)


def _dep(
    template: str = "web",
    *,
    pooled: bool = False,
    status: Status = Status.DEPLOYING,
    age: float = 0.0,
) -> Deployment:
    return Deployment(
        id=new_id(),
        template=template,
        status=status,
        created=now() - timedelta(seconds=age),
        cull_timeout_ms=1000,
        pooled=pooled,
        deployed_at=now() - timedelta(seconds=age) if status is Status.DEPLOYED else None,
    )


async def _open(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    store = make_store()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run(make_store: Callable[[], Store], case: Callable[[Store], object]) -> None:
    async def main() -> None:
        async for store in _open(make_store):
            await case(store)  # type: ignore[misc]

    anyio.run(main)


def test_insert_then_get_and_duplicate_refused(make_store: Callable[[], Store]) -> None:
    async def case(store: Store) -> None:
        dep = _dep()
        await store.insert(dep)
        assert await store.get(dep.id) == dep
        assert await store.get(new_id()) is None
        with pytest.raises(ConflictError):
            await store.insert(dep)

    run(make_store, case)


def test_move_sets_fields_and_is_idempotent(make_store: Callable[[], Store]) -> None:
    async def case(store: Store) -> None:
        dep = _dep()
        await store.insert(dep)
        change = Change(location="h/user/x", url="http://h/user/x/", target="http://a:1")
        moved = await store.move(dep.id, Status.DEPLOYED, change)
        assert moved is not None
        assert moved.status is Status.DEPLOYED
        assert (moved.location, moved.target, moved.reason) == ("h/user/x", "http://a:1", None)
        again = await store.move(dep.id, Status.DEPLOYED, change)  # a retried write that landed
        assert again == moved
        assert await store.move(dep.id, Status.DELETED, Change(reason="bye")) is not None
        # final: no way back, and no other final status over it
        assert await store.move(dep.id, Status.FAILED, Change(reason="late")) is None
        final = await store.get(dep.id)
        assert final is not None
        assert (final.status, final.reason) == (Status.DELETED, "bye")
        assert await store.move(new_id(), Status.DEPLOYED, change) is None

    run(make_store, case)


def test_moves_made_at_once_each_land_and_answer_their_own_record(
    make_store: Callable[[], Store],
) -> None:
    """A burst's moves to ``deployed`` (which the store may write together): each lands and
    answers its own record, a move of a record that cannot move answers None without holding
    the others back, and a record moved twice at once is moved once."""

    async def case(store: Store) -> None:
        deps = [_dep() for _ in range(20)]
        for dep in deps:
            await store.insert(dep)
        gone = deps[0]
        await store.move(gone.id, Status.DELETED, Change(reason="bye"))

        async def deploy(dep: Deployment) -> Deployment | None:
            change = Change(target=f"http://{dep.id}:1", deployed_at=now())
            return await store.move(dep.id, Status.DEPLOYED, change, known=dep)

        answers = await asyncio.gather(*(deploy(d) for d in [*deps, deps[1]]))
        assert answers[0] is None  # deleted before: no way to deployed
        for dep, answer in zip(deps[1:], answers[1:-1], strict=True):
            assert answer is not None
            assert (answer.id, answer.status, answer.target) == (
                dep.id,
                Status.DEPLOYED,
                f"http://{dep.id}:1",
            )
            assert answer == await store.get(dep.id)
        assert answers[-1] is not None  # its second move: it landed (by the first)
        assert answers[-1].id == deps[1].id

    run(make_store, case)


def test_move_and_update_from_the_known_record_match_what_is_stored(
    make_store: Callable[[], Store],
) -> None:
    """A caller that passes the record it knows gets back what a read would give."""

    async def case(store: Store) -> None:
        dep = _dep()
        await store.insert(dep)
        change = Change(target="http://a:1", backend_ref={"pid": 7}, deployed_at=now())
        moved = await store.move(dep.id, Status.DEPLOYED, change, known=dep)
        assert moved is not None
        assert moved == await store.get(dep.id)
        updated = await store.update(dep.id, Change(last_activity=now()), known=moved)
        assert updated == await store.get(dep.id)
        # a move that does not apply is not made up from the known record
        assert await store.move(dep.id, Status.DEPLOYING, Change(), known=updated) is None
        ended = await store.move(dep.id, Status.DELETED, Change(reason="bye"), known=updated)
        assert ended == await store.get(dep.id)

    run(make_store, case)


def test_update_sets_only_given_fields(make_store: Callable[[], Store]) -> None:
    async def case(store: Store) -> None:
        dep = _dep()
        await store.insert(dep)
        first = await store.update(dep.id, Change(target="http://a:1", backend_ref={"pid": 7}))
        assert first is not None
        assert (first.target, first.backend_ref, first.status) == (
            "http://a:1",
            {"pid": 7},
            Status.DEPLOYING,
        )
        seen = now()
        second = await store.update(dep.id, Change(last_activity=seen))
        assert second is not None
        assert (second.target, second.last_activity) == ("http://a:1", seen)
        assert await store.update(new_id(), Change(target="x")) is None

    run(make_store, case)


def test_find_filters_and_orders_by_creation(make_store: Callable[[], Store]) -> None:
    async def case(store: Store) -> None:
        old = _dep("web", age=30)
        new = _dep("web", age=1)
        other = _dep("db", status=Status.DEPLOYED, age=10)
        pooled = _dep("web", pooled=True, status=Status.DEPLOYED, age=5)
        for dep in (new, other, pooled, old):
            await store.insert(dep)
        assert [d.id for d in await store.find(template="web")] == [old.id, new.id]
        assert [d.id for d in await store.find(statuses=[Status.DEPLOYED])] == [other.id]
        assert [d.id for d in await store.find(pooled=True)] == [pooled.id]
        everything = await store.find(pooled=None)
        assert [d.id for d in everything] == [old.id, other.id, pooled.id, new.id]
        assert len(await store.find(pooled=None, limit=2)) == 2

    run(make_store, case)


def test_claim_hands_a_ready_pooled_instance_out_once(make_store: Callable[[], Store]) -> None:
    async def case(store: Store) -> None:
        ready = _dep("web", pooled=True, status=Status.DEPLOYED, age=3)
        starting = _dep("web", pooled=True)
        gone = _dep("web", pooled=True, status=Status.DEPLOYED)
        for dep in (ready, starting, gone):
            await store.insert(dep)
        await store.move(gone.id, Status.DELETED, Change(reason="retired"))
        clients = [f"10.0.0.{n}" for n in range(5)]
        won: list[str] = []

        async def claim(client: str) -> None:
            if await store.claim(ready.id, created=now(), cull_timeout_ms=5, client=client):
                won.append(client)

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(claim, client)
        assert len(won) == 1, "two claims got the same instance"
        got = await store.get(ready.id)
        assert got is not None
        assert (got.pooled, got.status, got.cull_timeout_ms, got.client) == (
            False,
            Status.DEPLOYED,
            5,
            won[0],
        )
        for not_ready in (starting.id, gone.id, new_id()):
            assert not await store.claim(not_ready, created=now(), cull_timeout_ms=5, client="a")
        assert [d.id for d in await store.find(pooled=True, statuses=ACTIVE)] == [starting.id]

    run(make_store, case)


def test_claim_retried_after_it_landed_is_a_success(make_store: Callable[[], Store]) -> None:
    """A claim whose answer was lost is written again by the driver: it is still this claim's."""

    async def case(store: Store) -> None:
        dep = _dep("web", pooled=True, status=Status.DEPLOYED)
        await store.insert(dep)
        when = now()
        for _ in range(2):
            assert await store.claim(dep.id, created=when, cull_timeout_ms=7, client="10.0.0.1")
        assert not await store.claim(dep.id, created=now(), cull_timeout_ms=7, client="10.0.0.2")

    run(make_store, case)


def test_templates_round_trip(make_store: Callable[[], Store]) -> None:
    async def case(store: Store) -> None:
        web = Template(name="web", command=("run",), env={"A": "1"}, pool_size=2)
        await store.put_template(web)
        await store.put_template(Template(name="api", command=("x",)))
        api = parse_template(Template(name="api", command=("x",)).to_api())
        assert await store.list_templates() == [api, parse_template(web.to_api())]
        assert await store.delete_template("web") is True
        assert await store.delete_template("web") is False
        assert await store.list_templates() == [api]

    run(make_store, case)


def test_a_template_keeps_the_version_that_seeded_it_until_the_next_seeding(
    make_store: Callable[[], Store],
) -> None:
    async def case(store: Store) -> None:
        seed = Template(name="web", command=("run",), pool_size=0)
        await store.put_template(seed, seeded=seed)
        await store.put_template(Template(name="api", command=("x",)))
        resized = Template(name="web", command=("run",), pool_size=3)
        await store.put_template(resized)  # an operator's change keeps the seed
        assert await store.seeded_templates() == {"web": parse_template(seed.to_api())}
        assert await store.list_templates() == [
            parse_template(Template(name="api", command=("x",)).to_api()),
            parse_template(resized.to_api()),
        ]
        reseed = Template(name="web", command=("serve",), pool_size=0)
        await store.put_template(resized, seeded=reseed)
        assert await store.seeded_templates() == {"web": parse_template(reseed.to_api())}
        assert await store.delete_template("web") is True
        assert await store.seeded_templates() == {}

    run(make_store, case)


def test_records_ended_at_once_each_end_once_with_numbers_of_their_own(
    make_store: Callable[[], Store],
) -> None:
    """A burst deleted at once (some of its apps failing meanwhile, some deleted twice):
    each record ends once, in the first status it was moved to, counted out once, with a
    number of the suite's sequence and of its template's that no other record has."""

    async def case(store: Store) -> None:
        deps = [_dep("web" if i % 3 else "other") for i in range(30)]
        for dep in deps:
            await store.insert(dep)
        deleted, failed = Change(reason="deleted"), Change(reason="the app exited")
        moves = [store.move(d.id, Status.DELETED, deleted) for d in deps]
        moves += [store.move(d.id, Status.DELETED, deleted) for d in deps[:5]]  # twice
        moves += [store.move(d.id, Status.FAILED, failed) for d in deps[5:10]]  # raced
        answers = await asyncio.gather(*moves)
        ends = {d.id: await store.get(d.id) for d in deps}
        for dep, answer in zip(deps + deps[:5], answers[:35], strict=True):
            end = ends[dep.id]
            assert end is not None
            assert answer == end
        for dep, answer in zip(deps[5:10], answers[35:], strict=True):
            end = ends[dep.id]
            assert end is not None
            assert answer is None if end.status is Status.DELETED else answer == end
        assert (await store.counts()).total == 0
        lowest, last = await store.ended_range(None)
        assert (lowest, last) == (1, 30)
        numbered = await store.ended(template=None, numbers=list(range(1, 31)))
        assert sorted(d.id for d in numbered) == sorted(d.id for d in deps)
        for template, n in (("web", 20), ("other", 10)):
            assert await store.ended_range(template) == (1, n)
            own = await store.ended(template=template, numbers=list(range(1, n + 1)))
            assert sorted(d.id for d in own) == sorted(d.id for d in deps if d.template == template)

    run(make_store, case)


def _siblings(kind: str, database: Database) -> tuple[Store, Store]:
    """Two servers' stores on one database."""
    if kind == "fake":
        store = FakeStore()
        return store, store.sibling()
    name = f"contract{secrets.token_hex(4)}"
    return MongoStore(uri=database.uri, database=name), MongoStore(uri=database.uri, database=name)


@pytest.mark.parametrize("kind", ["mongo", "fake"])
def test_progress_told_at_once_by_many_launches_reaches_other_servers_once_each_in_order(
    kind: str, database: Database
) -> None:
    """A burst's pods report their progress within milliseconds of each other: every message
    reaches the other servers' followers once, each launch's in the order its backend told
    them; the telling server's own stream leaves them out (it told its watchers itself)."""

    async def follow(store: Store, seen: list[tuple[str, str]], arrived: list[anyio.Event]) -> None:
        async for event in store.events():
            if event.progress is not None:
                seen.append(event.progress)
                arrived[0].set()
                arrived[0] = anyio.Event()

    async def main() -> None:
        teller, other = _siblings(kind, database)
        await teller.open()
        await other.open()
        seen: list[tuple[str, str]] = []
        own: list[tuple[str, str]] = []
        arrived = [anyio.Event()]
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow, other, seen, arrived)
                tg.start_soon(follow, teller, own, [anyio.Event()])
                with anyio.fail_after(10):  # a change stream follows from when it is open
                    while not seen:
                        await teller.progress("probe", "listening?")
                        with anyio.move_on_after(0.05):
                            await arrived[0].wait()
                seen.clear()
                told = {new_id(): [f"step {i}" for i in range(8)] for _ in range(5)}

                async def tell(dep_id: str, messages: list[str]) -> None:
                    for message in messages:
                        await teller.progress(dep_id, message)

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tellers:
                        for dep_id, messages in told.items():
                            tellers.start_soon(tell, dep_id, messages)
                    while len([p for p in seen if p[0] in told]) < 40:
                        await arrived[0].wait()
                with anyio.fail_after(10):  # the teller's stream brings the other's, not its own
                    while not own:
                        await other.progress("back", "from the other server")
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            await teller.close()
            await other.close()
        for dep_id, messages in told.items():
            assert [m for d, m in seen if d == dep_id] == messages
        assert set(own) == {("back", "from the other server")}

    anyio.run(main)


def test_writes_on_connections_the_database_broke_by_restarting_still_land(
    own_db: Database,
) -> None:
    """The store runs an operation once more when its connection broke under it (as the
    driver's retryable writes would): a database restarted between two launches costs them
    nothing, and each write lands once."""

    async def main() -> None:
        store = MongoStore(uri=own_db.uri, database=f"restart{secrets.token_hex(4)}")
        await store.open()
        try:
            deps = [_dep() for _ in range(3)]
            await store.insert(deps[0])
            own_db.kill9()  # the client's pooled connections are now dead
            own_db.start()
            await store.insert(deps[1])
            moved = await store.move(deps[0].id, Status.DEPLOYED, Change(url="http://a/"))
            assert moved is not None
            assert moved.status is Status.DEPLOYED
            own_db.kill9()
            own_db.start()
            await store.insert(deps[2])
            found = await store.find(statuses=ACTIVE)
            assert sorted(d.id for d in found) == sorted(d.id for d in deps)
        finally:
            await store.close()

    anyio.run(main)
