"""A program of another user that takes a service's port while the service is down, and keeps
what it is sent: what an app on the same host could do to catch the suite's credentials.

``Squatter(port).start()`` runs it as ``nobody`` (uid 65534; the tests run as root), listening on
``host:port``; :meth:`Squatter.received` is everything clients sent it so far."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from harness import port_open, wait_for

NOBODY = 65534
PROGRAM = r"""
import socket, sys, threading
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, port))
server.listen(128)
lock = threading.Lock()

def serve(conn):
    conn.settimeout(2)
    try:
        data = conn.recv(65536)
        if data:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    except OSError:
        data = b""
    with lock, open(out, "ab") as fh:
        fh.write(data)
    conn.close()

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class Squatter:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the squatter runs as another user: the test needs root")
        self.host, self.port = host, port
        self.dir = Path(tempfile.mkdtemp(prefix="binder-squatter-"))
        self.dir.chmod(0o777)
        self.capture = self.dir / "received"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Squatter:
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-c", PROGRAM, self.host, str(self.port), str(self.capture)],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), timeout=10, what="the squatter to listen")
        return self

    def received(self) -> bytes:
        return self.capture.read_bytes() if self.capture.exists() else b""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        wait_for(lambda: not port_open(self.port), timeout=10, what="the squatter to leave")

    def __enter__(self) -> Squatter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
