"""``scripts/bench launch --backend docker``: launch latency on containers and the engine's API
calls per launch."""

from __future__ import annotations

import statistics
import subprocess

import httpx

from scripts.benchmarks.shared import ROOT, api_calls, launch_once, pct, report, suite

DOCKER_TEMPLATE = {
    "image-source": "binder-busybox:test",
    "port": 8888,
    "command": [
        "/bin/sh",
        "-c",
        # the app's user is not root: of the image's files it writes only in its own /tmp
        "mkdir -p /tmp/www{base_url} && echo ok > /tmp/www{base_url}index.html "
        "&& exec httpd -f -p {port} -h /tmp/www",
    ],
}


def bench_launch_container(runs: int, backend: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "docker-engine"), "start"], check=True)
    template, extra = DOCKER_TEMPLATE, ""
    print(f"launch latency, POST -> deployed, {runs} launches on the {backend} backend")
    with (
        suite(cull_interval_seconds=3600, backend=backend, extra=extra) as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        c.put("/templates/bench", json=template, headers=server.auth).raise_for_status()
        launch_once(c, server, "bench")  # warm-up
        before = api_calls(c)
        latencies = [launch_once(c, server, "bench") for _ in range(runs)]
        after = api_calls(c)
    delta = {verb: (after.get(verb, 0) - before.get(verb, 0)) / runs for verb in after}
    writes = sum(
        v
        for k, v in delta.items()
        if k in ("create", "delete", "patch", "replace", "run", "remove")
    )
    figures: dict[str, float | int | str] = {
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": pct(latencies, 0.95) * 1000,
        "api_calls_per_launch": sum(delta.values()),
        "api_writes_per_launch": writes,
        "list_calls_per_launch": delta.get("list", 0) + delta.get("watch", 0),
    }
    targets = {
        "api_writes_per_launch": "(target <= 6; create + delete)",
    }
    report(f"launch-{backend}", figures, targets)
