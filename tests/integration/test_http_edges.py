"""Hostile connections against the real deploy API and log aggregator: huge or countless headers
are refused quickly, half-sent requests and stalled bodies are cut, deep JSON is a 422."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from harness import Database, DeployServer, LoggingServer

QUICK = 5.0
"""Seconds within which a refusal must reach the client."""

EDGES = {"header_timeout_seconds": 1, "idle_timeout_seconds": 1}


def _exchange(port: int, data: bytes, *, wait: float = QUICK) -> tuple[bytes, float]:
    """Send ``data`` (as far as the server takes it), then read until the server closes.

    Returns what came back (empty when the connection was just closed) and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # may be refused mid-send: what the client reads next matters
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer, time.monotonic() - started


def _refused_431(answer: bytes) -> bool:
    """The client reads the 431 (the server drops the rest of the head before closing)."""
    return answer.startswith(b"HTTP/1.1 431 ") and b"headersTooLarge" in answer


@pytest.fixture
def edged(deploy_factory: Callable[..., DeployServer]) -> DeployServer:
    return deploy_factory(sections={"http": EDGES}).start()


@pytest.fixture
def aggregator(tmp_path: Path, database: Database) -> Iterator[LoggingServer]:
    (tmp_path / "logging").mkdir()
    server = LoggingServer(tmp_path / "logging", database).start()
    yield server
    server.stop()


def _health_is_quick(url: str) -> None:
    started = time.monotonic()
    assert httpx.get(url + "/health", timeout=QUICK).status_code == 200
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % n for n in range(20_000)),
    ],
    ids=["1 MB header", "20000 headers"],
)
def test_huge_heads_are_refused_quickly_by_both_services(
    head: bytes, edged: DeployServer, aggregator: LoggingServer
) -> None:
    for url, port in ((edged.url, edged.port), (aggregator.url, aggregator.port)):
        answer, took = _exchange(port, head + b"\r\n")
        assert _refused_431(answer), answer[:200]
        assert took < QUICK
        _health_is_quick(url)


def test_too_many_small_headers_get_431(edged: DeployServer) -> None:
    headers = {f"X-{n}": "1" for n in range(150)}
    response = httpx.get(edged.url + "/health", headers=headers, timeout=QUICK)
    assert response.status_code == 431
    assert response.json()["type"] == "headersTooLarge"


def test_half_sent_request_is_cut_after_the_header_timeout(edged: DeployServer) -> None:
    answer, took = _exchange(edged.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", wait=10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 < took < 3.0
    silent, took = _exchange(edged.port, b"", wait=10)  # a connection that never says anything
    assert silent == b""
    assert took < 3.0


def test_stalled_body_is_cut_after_the_idle_timeout(edged: DeployServer) -> None:
    head = b"POST /applications/example HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    answer, took = _exchange(edged.port, head, wait=10)
    assert took < 3.0
    assert b" 500 " not in answer.split(b"\r\n", 1)[0]
    _health_is_quick(edged.url)


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"cull-timeout": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
    ids=["array", "inside an object"],
)
def test_deep_json_is_a_422(body: bytes, edged: DeployServer, aggregator: LoggingServer) -> None:
    for url in (f"{edged.url}/applications/example", f"{edged.url}/templates/deep"):
        response = httpx.request(
            "POST" if "applications" in url else "PUT",
            url,
            content=body[:60_000],
            headers={**edged.auth, "Content-Type": "application/json"},
            timeout=QUICK,
        )
        assert response.status_code == 422, response.text
        assert response.json()["type"] == "malformedRequest"
        assert "nested deeper" in response.json()["error"]
    logs = httpx.post(
        f"{aggregator.url}/logs", content=body, headers=aggregator.auth, timeout=QUICK
    )
    assert logs.status_code == 422, logs.text


HUGE_NUMBER = b"1" * 40_000
"""Longer than Python's int-from-string limit (4,300 digits): ``json.loads`` raises ValueError,
not the JSONDecodeError of a malformed body."""


def test_a_number_of_40000_digits_is_a_422_at_every_json_reader(
    edged: DeployServer, aggregator: LoggingServer
) -> None:
    json_headers = {"Content-Type": "application/json"}
    for method, path, body, extra in [
        ("POST", "/applications/example", b'{"cull-timeout": %s}', {}),
        ("POST", "/applications/", b'{"template-name": "example", "cull-timeout": %s}', {}),
        ("PUT", "/templates/big", b'{"command": ["true"], "port": %s}', edged.auth),
        ("PUT", "/pools/example", b'{"size": %s}', edged.auth),
    ]:  # the console's bodies are bounded at 4 KiB, below the int limit: 413 before parsing
        response = httpx.request(
            method,
            edged.url + path,
            content=body % HUGE_NUMBER,
            headers={**json_headers, **extra},
            timeout=QUICK,
        )
        assert response.status_code == 422, (path, response.text)
        assert response.json()["type"] == "malformedRequest"
    record = b'{"service": "s", "message": "m", "n": %s}' % HUGE_NUMBER
    for body in (b"[" + record + b"]", record + b"\n"):
        logs = httpx.post(
            f"{aggregator.url}/logs", content=body, headers=aggregator.auth, timeout=QUICK
        )
        assert logs.status_code == 422, logs.text
        assert logs.json()["type"] == "malformedRequest"
