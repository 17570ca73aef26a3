"""Benchmarks of the suite against its real components (see scripts/bench for the subcommands)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Database, DeployServer, LoggingServer, Proxy, free_port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(name: str, figures: dict[str, float | int | str], targets: dict[str, str]) -> None:
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:32} {shown}   {targets.get(key, '')}")
    print(json.dumps({"bench": name, **figures}))


@contextmanager
def suite(extra: str = "", **deploy: object) -> Iterator[DeployServer]:
    work = Path(tempfile.mkdtemp(prefix="binder-bench-"))
    db = Database(work).start()
    proxy = Proxy(work).start()
    # every request of a benchmark comes from 127.0.0.1: lift the per-client limits
    lifted = {"per_client_max_deployments": 1000, "per_client_launches_per_minute": 1000000}
    server = DeployServer(work, db, proxy, **{**lifted, **deploy})
    server.config.write_text(server.config.read_text() + extra)
    try:
        yield server.start()
    finally:
        server.stop()
        for pid in server.app_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        proxy.stop()
        db.stop()
        shutil.rmtree(work, ignore_errors=True)


def _launch_once(client: httpx.Client, server: DeployServer, template: str = "example") -> float:
    start = time.perf_counter()
    dep_id = client.post(f"/applications/{template}").json()["id"]
    while True:
        info = client.get(f"/applications/{template}/{dep_id}").json()
        if info["status"] != "deploying":
            break
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    if info["status"] != "deployed":
        raise SystemExit(f"launch failed: {info}")
    client.delete(f"/applications/{template}/{dep_id}", headers=server.auth)
    return elapsed


def _api_calls(client: httpx.Client) -> dict[str, float]:
    calls = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("binder_backend_api_calls_total{"):
            verb = line.split('verb="', 1)[1].split('"', 1)[0]
            calls[verb] = float(line.rsplit(" ", 1)[1])
    return calls


DOCKER_TEMPLATE = {
    "image-source": "binder-busybox:test",
    "port": 8888,
    "command": [
        "/bin/sh",
        "-c",
        "mkdir -p /www{base_url} && echo ok > /www{base_url}index.html "
        "&& exec httpd -f -p {port} -h /www",
    ],
}


def bench_launch(runs: int, backend: str, bursts: int = 5, client: str = "light") -> None:
    if backend == "kubernetes":
        from bench_kube import bench_launch_kubernetes

        return bench_launch_kubernetes(runs)
    if backend != "local":
        return bench_launch_container(runs, backend)
    import bench_launch as local

    figures, targets = local.run(runs, bursts, client)
    report("launch", figures, targets)


def bench_launch_container(runs: int, backend: str) -> None:
    root = Path(__file__).resolve().parent
    subprocess.run([str(root / "docker-engine"), "start"], check=True)
    template, extra = DOCKER_TEMPLATE, ""
    print(f"launch latency, POST -> deployed, {runs} launches on the {backend} backend")
    with (
        suite(cull_interval_seconds=3600, backend=backend, extra=extra) as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        c.put("/templates/bench", json=template, headers=server.auth).raise_for_status()
        _launch_once(c, server, "bench")  # warm-up
        before = _api_calls(c)
        latencies = [_launch_once(c, server, "bench") for _ in range(runs)]
        after = _api_calls(c)
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


WRK_SCRIPT = """
local ids = {}
for line in io.lines("%s") do ids[#ids + 1] = line end
local i = 0
request = function()
  i = i %% #ids + 1
  return wrk.format("GET", "/applications/example/" .. ids[i])
end
"""


def _wrk(url: str, seconds: int, script: Path | None = None) -> float:
    argv = ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise SystemExit(f"wrk printed no rate:\n{out}")


WARM_UP_SECONDS = 2
"""Unmeasured load on each endpoint first. The records were stored behind the server's back, so
before it every record is read once: the first read of each goes to the database, and a client
polling a deployment reads one the server already holds."""


def bench_status(seconds: int) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    print(
        f"status throughput at 32 connections over {seconds} s, 1,000 records stored; "
        f"each measured after every record was read once and a {WARM_UP_SECONDS} s warm-up"
    )
    from pymongo import MongoClient

    with suite(max_deployments=5000) as server:
        ids = [f"{n:032x}" for n in range(1, 1001)]
        now = datetime.now(UTC)
        db_name = "binder"
        with MongoClient(server.db.uri) as mongo:
            mongo[db_name]["deployments"].insert_many(
                [
                    {
                        "id": i,
                        "template": "example",
                        "status": "deleted",
                        "created": now,
                        "cull_timeout_ms": 3600000,
                        "location": f"h/user/{i}",
                        "url": f"http://h/user/{i}/",
                        "reason": "deleted by request",
                        "pooled": False,
                        "backend_ref": {},
                    }
                    for i in ids
                ]
            )
        id_file = server.workdir / "ids.txt"
        id_file.write_text("\n".join(ids) + "\n")
        script = server.workdir / "status.lua"
        script.write_text(WRK_SCRIPT % id_file)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in ids:
                client.get(f"/applications/example/{i}").raise_for_status()
        for url, lua in ((server.url + "/health", None), (server.url, script)):
            _wrk(url, WARM_UP_SECONDS, lua)
        health = _wrk(server.url + "/health", seconds)
        status = _wrk(server.url, seconds, script)
    figures = {"status_rps": status, "health_rps": health, "ratio": status / health}
    report("status", figures, {"ratio": "(target >= 0.90)"})


def bench_logs(lines: int) -> None:
    print(f"log aggregator: ingest from a sink, then `app` queries over {lines:,} stored lines")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from services.logging.sink import AggregatorSink

    work = Path(tempfile.mkdtemp(prefix="binder-bench-"))
    db = Database(work).start()
    logs = LoggingServer(work, db).start()
    try:
        sink = AggregatorSink(logs.url, token=logs.token, capacity=lines + 1)
        apps = [f"{n:032x}" for n in range(200)]
        stamp = datetime.now(UTC).isoformat()
        start = time.perf_counter()
        for n in range(lines):
            sink.push(
                {
                    "time": stamp,
                    "service": "bench",
                    "level": "info",
                    "message": f"line {n} of the benchmark",
                    "id": apps[n % len(apps)],
                }
            )
        sink.close(timeout=600)
        ingest_s = time.perf_counter() - start
        if sink.pending():
            raise SystemExit(f"{sink.pending()} lines were not delivered")
        latencies = []
        with httpx.Client(timeout=30, headers=logs.auth) as client:
            for n in range(100):
                t = time.perf_counter()
                r = client.get(
                    f"{logs.url}/logs", params={"app": apps[n % len(apps)], "limit": 100}
                )
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200 or len(r.json()["records"]) != 100:
                    raise SystemExit(f"query answered {r.status_code}: {r.text[:200]}")
    finally:
        logs.stop()
        db.stop()
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "ingest_lines_per_s": lines / ingest_s,
        "query_p50_ms": statistics.median(latencies) * 1000,
        "query_p95_ms": pct(latencies, 0.95) * 1000,
        "stored_lines": lines,
    }
    report(
        "logs",
        figures,
        {"ingest_lines_per_s": "(target >= 20000)", "query_p95_ms": "(target < 100)"},
    )


def bench_control(runs: int) -> None:
    print(f"binder-control: start-all to all ready, stop-all to nothing left, {runs} runs")
    binary = Path(sys.executable).parent / "binder-control"
    work = Path(tempfile.mkdtemp(prefix="binder-bench-"))
    config = work / "binder.toml"
    ports = [free_port() for _ in range(5)]
    config.write_text(
        f"[db]\nport = {ports[0]}\n[proxy]\nport = {ports[1]}\napi_port = {ports[2]}\n"
        f"[logging]\nport = {ports[3]}\n[deploy]\nport = {ports[4]}\n"
    )
    starts, stops = [], []
    try:
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(
                [str(binary), "--home", str(work / "home"), "start-all", "--config", str(config)],
                check=True,
                capture_output=True,
            )
            starts.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(
                [str(binary), "--home", str(work / "home"), "stop-all"],
                check=True,
                capture_output=True,
            )
            stops.append(time.perf_counter() - t)
    finally:
        subprocess.run([str(binary), "--home", str(work / "home"), "stop-all"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "start_all_median_s": statistics.median(starts),
        "start_all_max_s": max(starts),
        "stop_all_median_s": statistics.median(stops),
        "stop_all_max_s": max(stops),
    }
    report(
        "control",
        figures,
        {"start_all_median_s": "(target < 5)", "stop_all_median_s": "(target < 3)"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    launch = sub.add_parser("launch")
    launch.add_argument("--runs", type=int, default=None, help="50 (local) or 30 (containers)")
    launch.add_argument("--backend", choices=["local", "docker", "kubernetes"], default="local")
    launch.add_argument("--bursts", type=int, default=5, help="bursts of 10 (local; median taken)")
    launch.add_argument(
        "--client",
        choices=["light", "httpx"],
        default="light",
        help="how the local launches are made: one plain request each, read by httptools "
        "(light), or httpx (about five times the CPU, on the same two cores as the suite)",
    )
    status = sub.add_parser("status")
    status.add_argument("--seconds", type=int, default=10)
    logs = sub.add_parser("logs")
    logs.add_argument("--lines", type=int, default=200_000)
    control = sub.add_parser("control")
    control.add_argument("--runs", type=int, default=5)
    pages = sub.add_parser("pages")
    pages.add_argument("--runs", type=int, default=10)
    db = sub.add_parser("db", help="embedded database candidates side by side")
    db.add_argument("--rounds", type=int, default=5)
    db.add_argument("--seconds", type=float, default=3.0)
    db.add_argument("--records", type=int, default=1000, help="records the status moves go over")
    db.add_argument("--ferretdb", type=Path, default=None, help="a FerretDB 1.x binary")
    sub.add_parser("all")
    args = parser.parse_args()
    if args.what in ("launch", "all"):
        backend = getattr(args, "backend", "local")
        runs = getattr(args, "runs", None) or 30
        bench_launch(runs, backend, getattr(args, "bursts", 5), getattr(args, "client", "light"))
    if args.what in ("status", "all"):
        bench_status(getattr(args, "seconds", 10))
    if args.what in ("logs", "all"):
        bench_logs(getattr(args, "lines", 200_000))
    if args.what in ("control", "all"):
        bench_control(getattr(args, "runs", 5))
    if args.what in ("pages", "all"):
        from bench_pages import bench_pages

        bench_pages(getattr(args, "runs", 10) if args.what == "pages" else 10)
    if args.what in ("db", "all"):
        from bench_db import bench_db

        a = vars(args)
        bench_db(
            rounds=a.get("rounds", 5),
            seconds=a.get("seconds", 3.0),
            records=a.get("records", 1000),
            ferretdb=a.get("ferretdb"),
        )


if __name__ == "__main__":
    main()
