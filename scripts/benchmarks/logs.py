"""``scripts/bench logs``: log ingest from a sink, and the aggregator's ``app`` query."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from harness import Database, LoggingServer

from scripts.benchmarks.shared import pct, report
from services.logging.sink import AggregatorSink


def bench_logs(lines: int) -> None:
    print(f"log aggregator: ingest from a sink, then `app` queries over {lines:,} stored lines")
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
