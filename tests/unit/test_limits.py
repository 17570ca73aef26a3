"""Per-client limits and JSON depth, on their own (the HTTP side is in the integration tests)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from starlette.requests import Request

from common.web import check_json_depth
from services.deploy_kubernetes.errors import MalformedRequestError, RateLimitedError
from services.deploy_kubernetes.limits import KEY_CLIENT, ClientLimits, MovingWindow
from services.deploy_kubernetes.models import Deployment, Status


def _request(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "client": (peer, 40000), "headers": headers})


def _limits(**kwargs: object) -> ClientLimits:
    options: dict[str, object] = {"max_deployments": 2, "launches_per_minute": 100, **kwargs}
    return ClientLimits(**options)  # type: ignore[arg-type]


def _dep(dep_id: str, client: str | None) -> Deployment:
    return Deployment(
        id=dep_id,
        template="example",
        status=Status.DEPLOYED,
        created=datetime.now(UTC),
        cull_timeout_ms=60_000,
        client=client,
    )


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    open_limits = _limits()
    assert open_limits.client_of(_request("10.0.0.5", "1.2.3.4")) == "10.0.0.5"
    behind = _limits(trusted_proxies=["10.0.0.0/24", "192.168.1.1"])
    assert behind.client_of(_request("10.0.0.5", "1.2.3.4")) == "1.2.3.4"
    # the right-most hop that is not a trusted proxy; what the client wrote on the left is ignored
    chain = _request("10.0.0.5", "6.6.6.6, 1.2.3.4, 192.168.1.1")
    assert behind.client_of(chain) == "1.2.3.4"
    assert behind.client_of(_request("10.0.0.5", "6.6.6.6", "1.2.3.4")) == "1.2.3.4"
    assert behind.client_of(_request("10.0.0.5", "not an address")) == "10.0.0.5"
    assert behind.client_of(_request("10.0.0.5")) == "10.0.0.5"


def test_a_client_holds_at_most_its_deployments_until_one_ends() -> None:
    limits = _limits()
    limits.reserve("a").bind("d1")
    limits.reserve("a").bind("d2")
    with pytest.raises(RateLimitedError, match="per_client_max_deployments") as refused:
        limits.reserve("a")
    assert int(refused.value.headers["Retry-After"]) > 0
    limits.reserve("b").bind("d3")  # another client is not affected
    limits.note_end("d1")
    limits.note_end("d1")  # a second end of the same deployment frees nothing more
    limits.reserve("a").bind("d4")
    with pytest.raises(RateLimitedError):
        limits.reserve("a")


def test_a_cancelled_reservation_gives_its_slot_back() -> None:
    limits = _limits(max_deployments=1)
    limits.reserve("a").cancel()
    limits.reserve("a").bind("d1")
    with pytest.raises(RateLimitedError):
        limits.reserve("a")


def test_launches_per_minute_name_their_limit_and_when_to_retry() -> None:
    limits = _limits(max_deployments=100, launches_per_minute=3)
    for n in range(3):
        limits.reserve("a").bind(f"d{n}")
    with pytest.raises(RateLimitedError, match="per_client_launches_per_minute") as refused:
        limits.reserve("a")
    assert 0 < int(refused.value.headers["Retry-After"]) <= 60
    limits.reserve("b").bind("other")


def test_launch_window_moves_and_forgets_clients_gone_quiet() -> None:
    clock = [0.0]
    window = MovingWindow(amount=2, seconds=10.0, clock=lambda: clock[0])
    assert window.hit("a") == 0.0
    clock[0] = 4.0
    assert window.hit("a") == 0.0
    clock[0] = 6.0
    assert window.hit("a") == pytest.approx(4.0)  # full until the first launch is 10 s old
    assert window.hit("b") == 0.0  # another client has its own window
    clock[0] = 10.5
    assert window.hit("a") == 0.0  # the launch at 0 has left the window: room for one
    assert window.hit("a") == pytest.approx(3.5)  # the refused one at 6 took no room
    clock[0] = 30.0
    assert window.hit("c") == 0.0
    assert window.keys() == 1, "clients with no launch in the window are forgotten"


def test_seeding_counts_active_records_once_and_never_the_key_holders() -> None:
    limits = _limits()
    limits.reserve("a").bind("d1")
    limits.seed([_dep("d1", "a"), _dep("d2", "a"), _dep("k", KEY_CLIENT), _dep("p", None)])
    with pytest.raises(RateLimitedError):
        limits.reserve("a")
    assert limits.held() == {"a": 2}
    limits.note_end("d2")
    assert limits.held() == {"a": 1}


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
