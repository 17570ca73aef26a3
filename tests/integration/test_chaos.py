"""The short form of the fault-injection suite: a launch/delete/status load on the real suite
under supervisord while each service is killed with -9, the database frozen, and apps killed
(also while the database is down); then every invariant must count 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from harness import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("servers", [1, 2])
def test_short_chaos_run_breaks_no_invariant(servers: int) -> None:
    """With two servers the deploy-server fault kills the leader: the invariants hold and the
    leader moves."""
    argv = ["--seconds", "60", "--clients", "4", "--servers", str(servers)]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmarks.chaos", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith('{"bench": "chaos"')]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(lines[-1])
    assert figures["launches"] >= 20, figures  # the load really ran through the faults
    assert figures["faults"] == 7
    assert figures["invariants"] == {
        "lost": 0,
        "stuck": 0,
        "undeleted": 0,
        "unreachable": 0,
        "unowned": 0,
        "server_errors": 0,
        "left_running": 0,
        "leader_not_moved": 0,
    }, figures
    assert result.returncode == 0, result.stderr[-3000:]
