"""binder-sandbox's parked form makes the app's sandbox ahead of its launch, and again when bwrap
could not set it up (its mount setup races with mounts changing on the host: other apps' network
namespaces coming and going); the launch then runs the app once, in that sandbox, with the
command and environment of its request. A stand-in for bwrap fails its setup a given number of
times. A slot dropped before its launch leaves no process. And the suite's installation runs in
the sandbox from a folder the apps' users cannot reach (``--reach``), with real bwrap."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.deploy_kubernetes.backends.local.helper import (
    Sizes,
    bwrap,
    bwrap_args,
    closed_to_others,
    installation,
    launch_request,
    park_words,
    reachable_by_others,
)

STAND_IN = """#!/bin/sh
# bwrap's stand-in: fails its setup until the run numbered $2, then runs the waiter (after --)
echo x >> "$1"
if [ "$(wc -l < "$1")" -lt "$2" ]; then
    echo "bwrap: Can't bind mount /oldroot/ on /newroot/: No such file or directory" >&2
    exit 1
fi
shift 3
exec "$@"
"""
APP_RUNS = 'echo ran >> "$RUNS"; echo "the app ran as $(id -u) with $GREETING"; exit "$CODE"'


@dataclass
class Place:
    """A cgroup and a network namespace of the test's own, for a parked helper."""

    group: Path
    netns: Path

    def words(self, *, uid: int, sandbox: list[str], reach: list[Path] | None = None) -> list[str]:
        """As the backend parks a helper: the suite's installation (the waiter's) reachable by
        the app's user, and ``reach`` too."""
        reach = [*closed_to_others(installation()), *(reach or [])]
        return park_words([str(self.group)], self.netns, uid=uid, sandbox=sandbox, reach=reach)


@pytest.fixture
def place() -> Iterator[Place]:
    assert os.geteuid() == 0, "needs root: a cgroup and a network namespace"
    name = f"binder-setup-{secrets.token_hex(4)}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    group = Path("/sys/fs/cgroup") / name if v2 else Path("/sys/fs/cgroup/pids") / name
    group.mkdir()
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Place(group, Path(f"/run/netns/{name}"))
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
        _empty(group)
        group.rmdir()


def _empty(group: Path, within: float = 10.0) -> bool:
    """Whether the cgroup ``group`` has no process left (waited for up to ``within`` seconds)."""
    deadline = time.monotonic() + within
    while (group / "cgroup.procs").read_text().split():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder the apps' users can use (the stand-in, its count of runs)."""
    folder = Path(tempfile.mkdtemp(prefix="binder-setup-", dir="/tmp"))
    folder.chmod(0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def _parked(words: list[str]) -> tuple[subprocess.Popen[bytes], bytes]:
    """A parked helper and the first thing it said: "R" once its sandbox is made."""
    proc = subprocess.Popen(words, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    return proc, proc.stdout.read(1)


def _launch(proc: subprocess.Popen[bytes], request: bytes) -> int:
    """Hand ``request`` to a parked helper; its exit code once the app and it have ended."""
    proc.communicate(request, timeout=60)
    return proc.returncode


def _stand_in(shared: Path, set_up_at: int) -> tuple[list[str], Path]:
    stand_in = shared / "bwrap"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    runs = shared / "runs"
    return [str(stand_in), str(runs), str(set_up_at)], runs


def _app_request(tmp_path: Path, shared: Path, code: int) -> bytes:
    return launch_request(
        log=tmp_path / "app.log",
        log_max=1 << 20,
        status=tmp_path / "app.status",
        argv=["sh", "-c", APP_RUNS],  # looked up on the request's PATH
        env={
            "PATH": "/usr/bin:/bin",
            "RUNS": str(shared / "app-runs"),
            "GREETING": "its own environment",
            "CODE": str(code),
        },
    )


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize(
    ("set_up_at", "code"),
    [
        (2, 3),  # bwrap failed once: made again before the slot was handed out
        (1, 1),  # an app that exits 1 as a failed bwrap does: run once all the same
    ],
)
def test_a_sandbox_is_made_again_before_the_launch_and_the_app_runs_once(
    place: Place, shared: Path, tmp_path: Path, set_up_at: int, code: int
) -> None:
    sandbox, runs = _stand_in(shared, set_up_at=set_up_at)
    proc, said = _parked(place.words(uid=260001, sandbox=sandbox))
    assert said == b"R"
    assert _lines(runs) == set_up_at
    assert _launch(proc, _app_request(tmp_path, shared, code=code)) == code
    log = (tmp_path / "app.log").read_text()
    assert log == "the app ran as 260001 with its own environment\n"
    assert (tmp_path / "app.status").read_text() == f"exit {code}\n"
    assert (_lines(runs), _lines(shared / "app-runs")) == (set_up_at, 1)


def test_a_sandbox_that_never_sets_up_fails_its_slot_with_bwraps_words(
    place: Place, shared: Path
) -> None:
    sandbox, runs = _stand_in(shared, set_up_at=99)
    proc, said = _parked(place.words(uid=260001, sandbox=sandbox))
    assert said == b"F"
    out, _ = proc.communicate(timeout=60)
    assert b"bwrap: Can't bind mount /oldroot/" in out
    assert proc.returncode == 126
    assert _lines(runs) == 3


def test_the_app_runs_in_the_sandbox_made_ahead_with_nothing_of_its_waiter(
    place: Place, tmp_path: Path
) -> None:
    """Real bwrap: the app is the sandbox's, as its own user, with its request's command and
    environment, and none of the waiter's descriptors."""
    words = bwrap_args(
        hidden=[tmp_path], sizes=Sizes(), reachable=lambda _: True, shown=installation()
    )
    proc, said = _parked(place.words(uid=260003, sandbox=[bwrap(), *words]))
    assert said == b"R"
    # each descriptor past stderr that the shell has open (none: the waiter's socket is gone)
    opened = 'for fd in 3 4 5 6 7 8 9; do { true >&"$fd"; } 2>/dev/null && echo "open $fd"; done'
    script = f'echo "$(hostname) $(id -u) $PWD $GREETING"; {opened}; echo end'
    request = launch_request(
        log=tmp_path / "app.log",
        log_max=1 << 20,
        status=tmp_path / "app.status",
        argv=["sh", "-c", script],
        env={"PATH": "/usr/bin:/bin", "GREETING": "hello"},
    )
    assert _launch(proc, request) == 0
    log = (tmp_path / "app.log").read_text().splitlines()
    assert log == ["app 260003 /home/app hello", "end"]
    assert _empty(place.group)


def test_a_slot_dropped_before_its_launch_leaves_no_process(place: Place, tmp_path: Path) -> None:
    words = bwrap_args(
        hidden=[tmp_path], sizes=Sizes(), reachable=lambda _: True, shown=installation()
    )
    proc, said = _parked(place.words(uid=260004, sandbox=[bwrap(), *words]))
    assert said == b"R"
    assert len((place.group / "cgroup.procs").read_text().split()) >= 3  # helper, bwrap, waiter
    assert _launch(proc, b"") == 0  # end of file: no request
    assert _empty(place.group)


def test_a_slot_whose_sandbox_is_killed_before_its_launch_ends_its_helper(
    place: Place, tmp_path: Path
) -> None:
    """The server then drops the slot (a dead helper is never handed out) instead of launching
    an app into a sandbox that is gone."""
    words = bwrap_args(
        hidden=[tmp_path], sizes=Sizes(), reachable=lambda _: True, shown=installation()
    )
    proc, said = _parked(place.words(uid=260005, sandbox=[bwrap(), *words]))
    assert said == b"R"
    sandbox = [
        int(p) for p in (place.group / "cgroup.procs").read_text().split() if int(p) != proc.pid
    ]
    assert sandbox  # bwrap and the waiter
    for pid in sandbox:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == 126
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    proc.stdout.close()
    assert _empty(place.group)


APP = """#!/bin/sh
echo "ran from $(dirname "$0")"
cat "$(dirname "$0")/../secret" 2>&1 || echo "the rest of the closed folder is not shown"
"""


@pytest.mark.parametrize("under", ["/tmp", "/var/lib"])
def test_an_installation_in_a_folder_others_cannot_search_runs_sandboxed(
    place: Place, tmp_path: Path, under: str
) -> None:
    """A clone made by ``mktemp -d`` is 0700: bwrap, as the app's user, cannot bind it. The
    helper shows it all the same (``--reach``), and nothing else of the closed folder; under
    ``/tmp`` (a private tmpfs in the sandbox) and elsewhere; the host's mounts are untouched."""
    closed = Path(tempfile.mkdtemp(prefix="binder-closed-", dir=under))  # 0700
    try:
        checkout = closed / "checkout"
        checkout.mkdir(mode=0o755)
        checkout.chmod(0o755)
        app = checkout / "app"
        app.write_text(APP)
        app.chmod(0o755)
        (closed / "secret").write_text("not for apps")
        (closed / "secret").chmod(0o644)
        reach = closed_to_others([checkout, checkout / "."])
        assert reach == [checkout]
        words = bwrap_args(
            hidden=[],
            sizes=Sizes(),
            reachable=reachable_by_others,
            shown=[checkout, *installation()],
        )

        def run(reach: list[Path]) -> tuple[int, str]:
            log = tmp_path / f"app-{len(reach)}.log"
            request = launch_request(
                log=log,
                log_max=1 << 20,
                status=tmp_path / "app.status",
                argv=[str(app)],
                env={"PATH": "/usr/bin:/bin"},
            )
            proc, said = _parked(place.words(uid=260002, sandbox=[bwrap(), *words], reach=reach))
            if said != b"R":  # the sandbox could not be made: what bwrap said
                out, _ = proc.communicate(timeout=60)
                return proc.returncode, out.decode()
            return _launch(proc, request), log.read_text()

        code, log = run([])
        assert code != 0  # what it fixes: bwrap could not bind the installation
        assert "Permission denied" in log, log
        code, log = run(reach)
        assert code == 0, log
        assert f"ran from {checkout}" in log
        assert "not for apps" not in log
        assert "the rest of the closed folder is not shown" in log
        assert str(closed) not in Path("/proc/self/mountinfo").read_text()
        assert closed.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(closed)


MANY_DESCRIPTORS = """
import os, resource, sys
from services.deploy_kubernetes.backends.local.network import Network, suite_network

label = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]  # a server's connections
network = Network("q" + label[:6], suite_network(label))
network.prepare()
try:
    before = len(os.listdir("/proc/self/fd"))
    ns = network.make(7)
    print("made", ns.path.exists(), len(os.listdir("/proc/self/fd")) - before)
    network.remove(ns, link=True)
finally:
    network.drop_host_side()
"""


def test_a_sandbox_is_made_while_the_server_holds_over_a_thousand_descriptors() -> None:
    """libnftables waits with select(), which aborts the process on a descriptor past 1023: the
    namespace's rule is made in a thread whose descriptor table is its own, with low ones free,
    and nothing it opened is left in the server's."""
    result = subprocess.run(
        [sys.executable, "-c", MANY_DESCRIPTORS, secrets.token_hex(8)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["made", "True", "0"]
