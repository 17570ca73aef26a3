"""``scripts/bench control``: ``start-all`` until every service is ready, ``stop-all`` until
nothing is left."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import free_port

from scripts.benchmarks.shared import report


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
