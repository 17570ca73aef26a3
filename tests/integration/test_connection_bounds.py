"""Connections one party may hold: event streams and connections at the deploy API, clients that
never authenticate at the embedded database. One party over its bounds is refused; the others
are still served."""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Database, DeployServer, Proxy, wait_for
from pymongo import MongoClient
from squatter import NOBODY

STREAMS = 1000


def _status_lines(socks: list[socket.socket], *, timeout: float) -> Counter[str]:
    """The status code each socket's answer begins with ("none" when none came in time)."""
    codes: Counter[str] = Counter()
    selector = selectors.DefaultSelector()
    heads: dict[socket.socket, bytes] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, data=sock)
        heads[sock] = b""
    deadline = time.monotonic() + timeout
    while heads and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.data
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            heads[sock] += data
            if b"\r\n" in heads[sock] or not data:
                line = heads.pop(sock).split(b"\r\n", 1)[0].split(b" ")
                codes[line[1].decode() if len(line) > 1 else "closed"] += 1
                selector.unregister(sock)
    codes["none"] += len(heads)
    selector.close()
    return codes


@pytest.fixture
def streams_from_one_address(deploy: DeployServer) -> Iterator[tuple[DeployServer, str, Any]]:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")  # its stream stays open until it ends
    request = f"GET /applications/example/{dep_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    socks: list[socket.socket] = []
    try:
        for _ in range(STREAMS):  # from 127.0.0.6: 127.0.0.1 of the suite's user is its proxy
            sock = socket.create_connection(("127.0.0.1", deploy.port), 10, ("127.0.0.6", 0))
            with contextlib.suppress(OSError):  # a refused one may be closed already
                sock.sendall(request)
            socks.append(sock)
        yield deploy, dep_id, socks
    finally:
        for sock in socks:
            sock.close()


def test_a_thousand_event_streams_from_one_address_leave_other_clients_served(
    streams_from_one_address: tuple[DeployServer, str, list[socket.socket]],
) -> None:
    server, dep_id, socks = streams_from_one_address
    codes = _status_lines(socks, timeout=30)
    assert 0 < codes["200"] <= 60, codes  # per_client_event_streams
    assert codes["429"] + codes["closed"] >= STREAMS - 60, codes
    # another address (all of 127.0.0.0/8 is this host) is served, its stream included
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, base_url=server.url, timeout=10) as other:
        assert other.get("/health").status_code == 200
        assert other.get(f"/applications/example/{dep_id}").json()["status"] == "deployed"
        with other.stream("GET", f"/applications/example/{dep_id}/events") as stream:
            assert stream.status_code == 200
            assert next(stream.iter_lines()).startswith("event:")
    # the one address itself gets its answers again once it closes its streams
    for sock in socks:
        sock.close()
    wait_for(
        lambda: httpx.get(f"{server.url}/applications/example/{dep_id}").status_code == 200,
        timeout=10,
        what="the address served again",
    )


HOLD = r"""
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(count):
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        pass
print(len(held), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def guarded_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(tmp_path, options=("--auth-deadline", "2", "--max-unauthenticated", "16"))
    db.start()
    yield db
    db.stop()


def _holder(port: int, count: int) -> subprocess.Popen[str]:
    """Another user's program opening ``count`` connections that never authenticate."""
    return subprocess.Popen(
        ["/usr/bin/python3", "-c", HOLD, str(port), str(count)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _suite_can_work(db: Database) -> bool:
    with MongoClient[dict[str, Any]](
        db.uri, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000
    ) as client:
        client["bounds"]["probe"].insert_one({"ok": True})
        return client["bounds"]["probe"].count_documents({}) > 0


def test_unauthenticated_connections_of_another_user_do_not_lock_the_suite_out(
    guarded_db: Database,
) -> None:
    with _holder(guarded_db.port, 1200) as holder:  # beyond the server's 1,000 connections
        try:
            assert holder.stdout is not None
            assert int(holder.stdout.readline()) > 0
            assert _suite_can_work(guarded_db)
        finally:
            holder.kill()


def test_a_silent_stranger_is_cut_after_the_authentication_deadline(
    guarded_db: Database,
) -> None:
    with _holder(guarded_db.port, 1) as holder:
        try:
            assert holder.stdout is not None
            assert int(holder.stdout.readline()) == 1
            started = time.monotonic()
            wait_for(
                lambda: "cut 1 unauthenticated" in guarded_db.proc.output(),
                timeout=10,
                what="the stranger to be cut",
            )
            assert 1.5 < time.monotonic() - started < 8
        finally:
            holder.kill()
    # the suite's own clients (its drivers' monitoring connections never authenticate) are
    # not strangers: one stays open past the deadline
    with socket.create_connection(("127.0.0.1", guarded_db.port)) as own:
        own.settimeout(3.5)
        with pytest.raises(TimeoutError):
            own.recv(1)


@pytest.fixture
def bounded_proxy(tmp_path: Path) -> Iterator[Proxy]:
    edge = {"CHP_EDGE_PER_CLIENT": "20", "CHP_EDGE_HEADER_TIMEOUT_MS": "1000"}
    proxy = Proxy(tmp_path, edge=edge).start()
    yield proxy
    proxy.stop()


def test_the_public_proxy_bounds_each_clients_connections_and_slow_heads(
    bounded_proxy: Proxy,
) -> None:
    port = bounded_proxy.port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    try:
        codes = _status_lines(socks[20:], timeout=10)
        assert codes == Counter({"429": 30, "none": 0}), codes
        # another address is served while this one holds its 20
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=5) as other:
            served = other.get(f"http://127.0.0.1:{port}/user/nobody/")
            assert served.status_code in (404, 503), served  # the proxy's own answer
        # a head that never ends is cut after the deadline (not after node's 60 s)
        other_address = ("127.0.0.2", 0)
        with socket.create_connection(("127.0.0.1", port), 10, other_address) as slow:
            started = time.monotonic()
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := slow.recv(4096):
                    answer += chunk
            assert time.monotonic() - started < 4
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        for sock in socks:
            sock.close()
