"""The benchmarks' command line parses: each form's help is printed, none collides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("what", ["launch", "status", "logs", "control", "pages", "db", "proxy"])
def test_each_benchmark_prints_its_help(what: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "scripts.benchmarks", what, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: scripts/bench {what}"), done.stdout
