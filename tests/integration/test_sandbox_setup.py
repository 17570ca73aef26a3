"""binder-sandbox's parked launch makes a sandbox again when bwrap could not set it up (its
mount setup races with mounts changing on the host: other apps' network namespaces coming and
going), and only then: an app that ran and failed is not run twice. A stand-in for bwrap says,
as bwrap does on its ``--json-status-fd``, whether the app ran."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.deploy_kubernetes.backends.local.helper import SETUP_FD, helper, launch_request

STAND_IN = """#!/bin/sh
# bwrap's stand-in: fails its setup (no "exit-code") until the run numbered $SET_UP_AT
echo x >> "$RUNS"
if [ "$(wc -l < "$RUNS")" -lt "$SET_UP_AT" ]; then
    echo "bwrap: Can't bind mount /oldroot/ on /newroot/: No such file or directory" >&2
    exit 1
fi
echo '{ "exit-code": 3 }' >&3
echo "the app ran"
exit 3
"""


@pytest.fixture
def park(tmp_path: Path) -> Iterator[list[str]]:
    """A parked binder-sandbox's words: a cgroup and a network namespace of the test's own."""
    assert os.geteuid() == 0, "needs root: a cgroup and a network namespace"
    name = f"binder-setup-{secrets.token_hex(4)}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    group = Path("/sys/fs/cgroup") / name if v2 else Path("/sys/fs/cgroup/pids") / name
    group.mkdir()
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield [helper(), "--park", f"--cgroup={group}", f"--netns=/run/netns/{name}"]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
        group.rmdir()


def _launch(park: list[str], tmp_path: Path, set_up_at: int) -> tuple[str, str, int]:
    """Run the stand-in through a parked helper; the log, the status and the number of runs."""
    shared = Path(tempfile.mkdtemp(prefix="binder-setup-", dir="/tmp"))  # the app's user's too
    try:
        shared.chmod(0o1777)
        stand_in = shared / "bwrap"
        stand_in.write_text(STAND_IN)
        stand_in.chmod(0o755)
        runs = shared / "runs"
        log, status = tmp_path / "app.log", tmp_path / "app.status"
        request = launch_request(
            uid=260001,
            log=log,
            log_max=1 << 20,
            status=status,
            argv=[str(stand_in)],
            env={"PATH": "/usr/bin:/bin", "RUNS": str(runs), "SET_UP_AT": str(set_up_at)},
            setup_fd=SETUP_FD,
        )
        with subprocess.Popen(park, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            assert proc.stdin is not None
            assert proc.stdout.read(1) == b"R"
            proc.stdin.write(request)
            proc.stdin.close()
            assert proc.wait(timeout=60) == (3 if set_up_at <= 3 else 1)
        return log.read_text(), status.read_text(), len(runs.read_text().splitlines())
    finally:
        shutil.rmtree(shared)


def test_a_sandbox_that_could_not_be_set_up_is_made_again(park: list[str], tmp_path: Path) -> None:
    log, status, runs = _launch(park, tmp_path, set_up_at=2)
    assert runs == 2
    assert log.count("[binder: the sandbox could not be set up; trying again]") == 1
    assert log.rstrip().endswith("the app ran"), log
    assert status == "exit 3\n"


def test_an_app_that_ran_and_failed_is_not_run_again(park: list[str], tmp_path: Path) -> None:
    log, status, runs = _launch(park, tmp_path, set_up_at=1)
    assert (runs, status) == (1, "exit 3\n")
    assert "trying again" not in log


def test_a_sandbox_that_never_sets_up_is_tried_three_times(park: list[str], tmp_path: Path) -> None:
    log, status, runs = _launch(park, tmp_path, set_up_at=99)
    assert (runs, status) == (3, "exit 1\n")
    assert log.count("trying again") == 2
    assert log.count("bwrap: Can't bind mount") == 3
