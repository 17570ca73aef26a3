"""What the bounds on the public proxy cost (``services/proxy_edge.js``): requests through
configurable-http-proxy to a small node app, with the bounds and without, alternating rounds so
that both see the same machine. A new connection per request (where the per-client count is
kept) and kept-alive connections (where it is not) are measured apart."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from harness import CHP, PROXY_EDGE, Proxy, free_port, port_open, wait_for

from scripts.benchmarks.shared import pct, report

APP = (
    "require('http').createServer((q, s) => { s.setHeader('content-length', 2); s.end('ok'); })"
    ".listen(Number(process.argv[1]), '127.0.0.1')"
)


def _plain_proxy(work: Path) -> Proxy:
    """The proxy as it ran before the bounds: configurable-http-proxy alone."""
    proxy = Proxy(work)
    assert proxy.proc.argv[:3] == ["node", "--require", str(PROXY_EDGE)]
    proxy.proc.argv = [str(CHP), *proxy.proc.argv[4:]]
    return proxy


def _request(port: int, path: str, sock: socket.socket | None) -> float:
    """Seconds for one GET through the proxy (on ``sock``, or on a connection of its own)."""
    started = time.perf_counter()
    own = sock is None
    conn = socket.create_connection(("127.0.0.1", port)) if sock is None else sock
    try:
        close = "close" if own else "keep-alive"
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: {close}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"ok"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert b" 200 " in answer.split(b"\r\n", 1)[0], answer[:100]
    finally:
        if own:
            conn.close()
    return time.perf_counter() - started


def _round(port: int, path: str, n: int, *, kept: bool) -> list[float]:
    if not kept:
        return [_request(port, path, None) for _ in range(n)]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        return [_request(port, path, sock) for _ in range(n)]


def bench_proxy(requests: int = 2000, rounds: int = 6) -> None:
    work = Path(tempfile.mkdtemp(prefix="binder-bench-proxy-"))
    app_port = free_port()
    app = subprocess.Popen(["node", "-e", APP, str(app_port)], env=os.environ)
    proxies = {"plain": _plain_proxy(work / "plain"), "bounded": Proxy(work / "bounded")}
    try:
        (work / "plain").mkdir(parents=True)
        (work / "bounded").mkdir(parents=True)
        wait_for(lambda: port_open(app_port), what="the app")
        path = "/user/bench/x"
        for proxy in proxies.values():
            proxy.start()
            proxy_add(proxy, "/user/bench", f"http://127.0.0.1:{app_port}")
        times: dict[tuple[str, bool], list[float]] = {}
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for name, proxy in proxies.items():
                for kept in (False, True):
                    times.setdefault((name, kept), []).extend(
                        _round(proxy.port, path, per_round, kept=kept)
                    )
        figures: dict[str, float | int | str] = {"requests_each": per_round * rounds}
        for (name, kept), values in times.items():
            kind = "kept_alive" if kept else "new_connection"
            figures[f"{kind}_{name}_p50_ms"] = statistics.median(values) * 1000
            figures[f"{kind}_{name}_p99_ms"] = pct(values, 0.99) * 1000
        for kind in ("new_connection", "kept_alive"):
            cost = figures[f"{kind}_bounded_p50_ms"] - figures[f"{kind}_plain_p50_ms"]  # type: ignore[operator]
            figures[f"{kind}_cost_p50_ms"] = cost
        report("proxy", figures, {"new_connection_cost_p50_ms": "< 0.05 ms"})
    finally:
        for proxy in proxies.values():
            proxy.stop()
        app.terminate()
        app.wait(5)
        shutil.rmtree(work, ignore_errors=True)


def proxy_add(proxy: Proxy, path: str, target: str) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{proxy.api_port}/api/routes{path}",
        json={"target": target},
        headers={"Authorization": f"token {proxy.token}"},
        timeout=5,
    )
    response.raise_for_status()
