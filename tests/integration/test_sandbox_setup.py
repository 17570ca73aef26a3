"""binder-sandbox's parked launch makes a sandbox again when bwrap could not set it up (its
mount setup races with mounts changing on the host: other apps' network namespaces coming and
going), and only then: an app that ran and failed is not run twice. A stand-in for bwrap says,
as bwrap does on its ``--json-status-fd``, whether the app ran. And the suite's installation
runs in the sandbox from a folder the apps' users cannot reach (``--reach``), with real bwrap."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.deploy_kubernetes.backends.local.helper import (
    SETUP_FD,
    Sizes,
    bwrap,
    bwrap_args,
    closed_to_others,
    helper,
    launch_request,
    reachable_by_others,
)

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


def _run_parked(park: list[str], request: bytes) -> int:
    """Hand ``request`` to a parked helper; its exit code once the app and it have ended."""
    with subprocess.Popen(park, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.read(1) == b"R"
        proc.stdin.write(request)
        proc.stdin.close()
        return proc.wait(timeout=60)


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
        assert _run_parked(park, request) == (3 if set_up_at <= 3 else 1)
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


APP = """#!/bin/sh
echo "ran from $(dirname "$0")"
cat "$(dirname "$0")/../secret" 2>&1 || echo "the rest of the closed folder is not shown"
"""


@pytest.mark.parametrize("under", ["/tmp", "/var/lib"])
def test_an_installation_in_a_folder_others_cannot_search_runs_sandboxed(
    park: list[str], tmp_path: Path, under: str
) -> None:
    """A clone made by ``mktemp -d`` is 0700: bwrap, as the app's user, cannot bind it. The
    helper shows it all the same (``--reach``), and nothing else of the closed folder; under
    ``/tmp`` (a private tmpfs in the sandbox) and elsewhere; the host's mounts are untouched."""
    closed = Path(tempfile.mkdtemp(prefix="binder-closed-", dir=under))  # 0700
    try:
        installation = closed / "checkout"
        installation.mkdir(mode=0o755)
        installation.chmod(0o755)
        app = installation / "app"
        app.write_text(APP)
        app.chmod(0o755)
        (closed / "secret").write_text("not for apps")
        (closed / "secret").chmod(0o644)
        reach = closed_to_others([installation, installation / "."])
        assert reach == [installation]
        words = bwrap_args(
            hidden=[], sizes=Sizes(), reachable=reachable_by_others, shown=[installation]
        )

        def run(reach: list[Path]) -> tuple[int, str]:
            log = tmp_path / f"app-{len(reach)}.log"
            request = launch_request(
                uid=260002,
                log=log,
                log_max=1 << 20,
                status=tmp_path / "app.status",
                argv=[bwrap(), *words, "--", str(app)],
                env={"PATH": "/usr/bin:/bin"},
                setup_fd=SETUP_FD,
                reach=reach,
            )
            return _run_parked(park, request), log.read_text()

        code, log = run([])
        assert code != 0  # what it fixes: bwrap could not bind the installation
        assert "Permission denied" in log, log
        code, log = run(reach)
        assert code == 0, log
        assert f"ran from {installation}" in log
        assert "not for apps" not in log
        assert "the rest of the closed folder is not shown" in log
        assert str(closed) not in Path("/proc/self/mountinfo").read_text()
        assert closed.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(closed)
