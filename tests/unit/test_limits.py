"""Per-client limits, the caller they apply to, and JSON depth, on their own (the HTTP side is in
the integration tests)."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import pytest
from fakes import FakeStore, FakeWindows
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from common.web import check_json_depth
from services.deploy_kubernetes.api.caller import CallerMiddleware
from services.deploy_kubernetes.engine.limits import KEY_CLIENT, Caller, ClientLimits
from services.deploy_kubernetes.engine.metrics import Metrics
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.errors import (
    MalformedRequestError,
    RateLimitedError,
    UnauthorizedError,
)
from services.deploy_kubernetes.models import Deployment, Status
from services.deploy_kubernetes.store.base import Change


def _request(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "client": (peer, 40000), "headers": headers})


async def _nothing(scope: Scope, receive: Receive, send: Send) -> None:
    return None


async def _receive() -> Message:
    return {"type": "http.disconnect"}


async def _send(message: Message) -> None:
    return None


def _limits(**kwargs: object) -> ClientLimits:
    options: dict[str, object] = {
        "max_deployments": 2,
        "launches_per_minute": 100,
        "windows": FakeWindows(),
        **kwargs,
    }
    return ClientLimits(**options)  # type: ignore[arg-type]


def _dep(dep_id: str, client: str | None) -> Deployment:
    return Deployment(
        id=dep_id,
        template="example",
        status=Status.DEPLOYING,
        created=datetime.now(UTC),
        cull_timeout_ms=60_000,
        client=client,
    )


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    open_edge = CallerMiddleware(_nothing, api_key="")
    assert open_edge.address_of(_request("10.0.0.5", "1.2.3.4")) == "10.0.0.5"
    behind = CallerMiddleware(_nothing, api_key="", trusted_proxies=["10.0.0.0/24", "192.168.1.1"])
    assert behind.address_of(_request("10.0.0.5", "1.2.3.4")) == "1.2.3.4"
    # the right-most hop that is not a trusted proxy; what the client wrote on the left is ignored
    chain = _request("10.0.0.5", "6.6.6.6, 1.2.3.4, 192.168.1.1")
    assert behind.address_of(chain) == "1.2.3.4"
    assert behind.address_of(_request("10.0.0.5", "6.6.6.6", "1.2.3.4")) == "1.2.3.4"
    assert behind.address_of(_request("10.0.0.5", "not an address")) == "10.0.0.5"
    assert behind.address_of(_request("10.0.0.5")) == "10.0.0.5"


def test_a_client_holds_at_most_its_deployments_until_one_ends() -> None:
    async def main() -> None:
        store = FakeStore()
        records = Records(store=store, metrics=Metrics(), max_deployments=10)
        await records.open()
        await records.admit(_dep("d1", "a"), client_limit=2)
        await records.admit(_dep("d2", "a"), client_limit=2)
        with pytest.raises(RateLimitedError, match="per_client_max_deployments") as refused:
            await records.admit(_dep("d3", "a"), client_limit=2)
        assert int(refused.value.headers["Retry-After"]) > 0
        assert "d3" not in store.deps, "a refused launch writes nothing"
        await records.admit(_dep("d4", "b"), client_limit=2)  # another client is not affected
        d1 = store.deps["d1"]
        await records.move(d1, Status.DELETED, Change(reason="bye"))
        await records.move(d1, Status.DELETED, Change(reason="bye"))  # frees nothing more
        await records.admit(_dep("d5", "a"), client_limit=2)
        with pytest.raises(RateLimitedError):
            await records.admit(_dep("d6", "a"), client_limit=2)
        assert (await store.counts()).clients == {"a": 2, "b": 1}

    anyio.run(main)


def test_launches_per_minute_name_their_limit_and_when_to_retry() -> None:
    async def main() -> None:
        limits = _limits(launches_per_minute=3, windows=FakeWindows(amount=3))
        for _ in range(3):
            await limits.hit(Caller(address="a"))
        with pytest.raises(RateLimitedError, match="per_client_launches_per_minute") as refused:
            await limits.hit(Caller(address="a"))
        assert 0 < int(refused.value.headers["Retry-After"]) <= 60
        await limits.hit(Caller(address="b"))
        for _ in range(10):  # a caller with the key is not counted
            await limits.hit(Caller(address="a", keyed=True))
        assert limits.refused["per_client_launches_per_minute"] == 1

    anyio.run(main)


def test_the_launch_window_moves() -> None:
    async def main() -> None:
        clock = [0.0]
        window = FakeWindows(amount=2, seconds=10.0, clock=lambda: clock[0])
        assert await window.hit("a") == 0.0
        clock[0] = 4.0
        assert await window.hit("a") == 0.0
        clock[0] = 6.0
        assert await window.hit("a") == pytest.approx(4.0)  # full until the first is 10 s old
        assert await window.hit("b") == 0.0  # another client has its own window
        clock[0] = 10.5
        assert await window.hit("a") == 0.0  # the launch at 0 has left the window
        assert await window.hit("a") == pytest.approx(3.5)  # the refused one at 6 took no room

    anyio.run(main)


def test_the_held_counts_shown_never_name_the_key_holders() -> None:
    limits = _limits()
    limits.note_held({"a": 2, KEY_CLIENT: 5, "b": 0})
    assert limits.held() == {"a": 2}


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        (b'{"a": [[1, 2], {"b": 3}]}', True),
        (b"[" * 4 + b"]" * 4, True),
        (b"[" * 5 + b"]" * 5, False),
        (b"[" * 100_000, False),
        (b'{"a": "[[[[[[[[[[[[[[[[[[[["}', True),  # brackets inside strings do not count
        (b'{"a": "\\"[[[[[[[[[[[[[[[[[["}', True),
    ],
)
def test_json_nesting_is_bounded(body: bytes, ok: bool) -> None:
    if ok:
        check_json_depth(body, 4)
    else:
        with pytest.raises(MalformedRequestError, match="nested deeper than 4"):
            check_json_depth(body, 4)


def test_the_caller_is_worked_out_once_at_the_edge_and_read_by_the_routes() -> None:
    seen: list[Caller] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(Request(scope).state.caller)

    edge = CallerMiddleware(app, api_key="secret", trusted_proxies=["10.0.0.0/24"])
    for header in (b"secret", b"Bearer secret", b"token secret", b"wrong"):
        scope = {
            "type": "http",
            "client": ("10.0.0.5", 40000),
            "headers": [(b"authorization", header), (b"x-forwarded-for", b"1.2.3.4")],
        }
        anyio.run(edge, scope, _receive, _send)
    assert [c.keyed for c in seen] == [True, True, True, False]
    assert {c.address for c in seen} == {"1.2.3.4"}
    assert (seen[0].client, seen[0].who) == (KEY_CLIENT, f"{KEY_CLIENT} from 1.2.3.4")
    assert (seen[3].client, seen[3].who) == ("1.2.3.4", "1.2.3.4")
    seen[0].require_key()
    with pytest.raises(UnauthorizedError, match="missing or wrong API key"):
        seen[3].require_key()
