"""The kernel's word on who holds a socket, and the waits and checks built on it, against real
sockets of this host (another user's sockets: tests/integration/test_squatters.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from common.local_http import request
from common.owned_http import hooks
from common.peers import Listener, check_peer, listeners, peer_uid, suite_uid
from control.launch import free, wait_for_ports


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_the_socket_at_the_other_end_is_the_suites_before_and_after_accept(
    server: socket.socket,
) -> None:
    with socket.create_connection(server.getsockname()) as client:
        assert peer_uid(client) == suite_uid()  # waiting in the backlog: the listener's owner
        accepted, _ = server.accept()
        with accepted:
            assert peer_uid(client) == suite_uid()
            check_peer(client, what="a token")


def test_a_look_costs_tens_of_microseconds(server: socket.socket) -> None:
    with socket.create_connection(server.getsockname()) as client:
        started = time.perf_counter()
        for _ in range(200):
            check_peer(client, what="a token")
        assert (time.perf_counter() - started) / 200 < 0.001


def test_listeners_name_address_port_and_owner(server: socket.socket) -> None:
    port = server.getsockname()[1]
    assert listeners(port) == [Listener(address="127.0.0.1", port=port, uid=suite_uid())]
    with socket.socket(socket.AF_INET6) as six:
        six.bind(("::1", 0))
        six.listen()
        assert listeners(six.getsockname()[1])[0].address == "::1"
    server.close()
    assert listeners(port) == []


def test_the_clients_that_carry_credentials_reach_the_suites_own_servers(
    server: socket.socket,
) -> None:
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    async def both() -> None:
        answered = asyncio.get_running_loop().run_in_executor(None, answer)
        got = await request(f"http://127.0.0.1:{port}/", seconds=5, credential="a token")
        await answered
        assert got.status == 200
        answered = asyncio.get_running_loop().run_in_executor(None, answer)
        with httpx.Client(event_hooks=hooks("a token")) as client:
            assert (await asyncio.to_thread(client.get, f"http://127.0.0.1:{port}/")).text == "ok"
        await answered

    asyncio.run(both())


def test_the_launcher_waits_for_a_taken_port_saying_so(server: socket.socket) -> None:
    host, port = server.getsockname()
    assert not free(host, port)
    said: list[str] = []
    looks: list[float] = []

    def sleep(seconds: float) -> None:
        looks.append(seconds)
        if len(looks) == 3:
            server.close()

    wait_for_ports([(host, port)], say=said.append, sleep=sleep)
    assert len(said) == 3
    assert f"port {port} (127.0.0.1) is taken by user {suite_uid()}" in said[0]
    assert looks == sorted(looks)  # looking again less and less often
    assert looks[-1] > looks[0]
    assert free(host, port)
