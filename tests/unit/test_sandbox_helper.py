"""binder-sandbox, which every app of the local backend starts through, and the words it is
given. Its direct form (trusted templates) sets the memory limit and execs the app in place, and
fails as the util-linux tools do; its parked form's launch (which needs root, cgroups and a
network namespace) is held by the integration tests of the sandbox."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from services.deploy_kubernetes.backends.local.helper import (
    Sizes,
    bwrap_args,
    closed_to_others,
    direct_words,
    helper,
    launch_request,
    park_words,
)
from services.deploy_kubernetes.backends.local.users import AppUser

REPORT = "import json, os, resource; print(json.dumps([resource.getrlimit(resource.RLIMIT_AS), os.getpid()]))"


def test_the_limit_is_set_and_the_app_runs_in_its_place() -> None:
    argv = [*direct_words(300 * 2**20, None), sys.executable, "-c", REPORT]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    limit, pid = json.loads(out)
    assert limit == [300 * 2**20] * 2
    assert pid == proc.pid  # exec'd in place: no process between the spawn and the app


def test_the_words_before_the_command() -> None:
    user = AppUser("app", 2000, 3000)
    assert direct_words(None, None) == [helper(), "--"]
    assert direct_words(1024, user) == [helper(), "--as=1024", "--uid=2000", "--gid=3000", "--"]
    cgroups, netns = ["/cg/memory/slot-3", "/cg/pids/slot-3"], Path("/run/netns/b1-3")
    park = [helper(), "--park", *(f"--cgroup={c}" for c in cgroups), f"--netns={netns}"]
    assert park_words(cgroups, netns, uid=200001, sandbox=["/usr/bin/bwrap", "--unshare-all"]) == [
        *park,
        "--uid=200001",
        "--gid=200001",
        "--",
        "/usr/bin/bwrap",
        "--unshare-all",
        "--",
        helper(),
        "--wait",
    ]
    assert park_words(cgroups, netns, uid=7, sandbox=[], reach=[Path("/srv/x")]) == [
        *park,
        "--uid=7",
        "--gid=7",
        "--reach=/srv/x",
        "--",
        helper(),
        "--wait",
    ]


@pytest.mark.parametrize(
    ("options", "code"),
    [
        (["--", "no-such-program-here"], 127),
        (["--as=lots", "--", "true"], 126),
        (["--uid=2000", "--", "true"], 126),  # a user without its group
        (["--as=1024"], 126),  # no program
        (
            ["--log=/tmp/x", "--", "true"],
            126,
        ),  # the parked launch's options are not the direct form's
        (["--park"], 126),  # a park without cgroups or namespace
        (["--park", "--cgroup=/nowhere", "--netns=/nowhere"], 126),  # nor user, nor program
        (["--park", "--cgroup=/x", "--netns=/x", "--uid=0", "--gid=0", "--", "/bin/true"], 126),
        (["--park", "--cgroup=/x", "--netns=/x", "--uid=5", "--gid=5", "--", "true"], 126),
        (["--wait", "extra"], 126),
    ],
)
def test_failures_exit_as_the_util_linux_tools_do(options: list[str], code: int) -> None:
    result = subprocess.run([helper(), *options], capture_output=True, text=True, timeout=30)
    assert result.returncode == code
    assert result.stderr.startswith(("binder-sandbox", "usage: binder-sandbox"))


def test_a_launch_request_is_its_words_then_the_environment() -> None:
    request = launch_request(
        log=Path("/h/logs/apps/a.log"),
        log_max=8192,
        status=Path("/h/run/local/a.status"),
        argv=["app", "two words"],
        env={"PORT": "8888", "HOME": "/home/app"},
    )
    assert request.split(b"\0") == [
        b"--log=/h/logs/apps/a.log",
        b"--log-max=8192",
        b"--status=/h/run/local/a.status",
        b"--",
        b"app",
        b"two words",
        b"",
        b"PORT=8888",
        b"HOME=/home/app",
        b"",
    ]
    with pytest.raises(ValueError, match="NUL"):
        launch_request(log=Path("/l"), log_max=1, status=Path("/s"), argv=["a\0b"], env={})


def test_bwrap_hides_the_suites_folders_that_an_app_could_reach() -> None:
    reachable = {Path("/srv/suite"), Path("/srv/apps")}
    args = bwrap_args(
        hidden=[
            Path("/srv/suite"),
            Path("/tmp/suite-home"),
            Path("/root/.binder"),
            Path("/srv/apps/../apps"),
            Path("/opt/closed"),
        ],
        sizes=Sizes(home=1000, tmp=2000, shm=3000),
        reachable=lambda p: p in reachable,
    )
    assert args == [
        "--unshare-all", "--share-net", "--unshare-user", "--disable-userns", "--new-session",
        "--hostname", "app",
        "--ro-bind", "/", "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--size", "3000", "--tmpfs", "/dev/shm",
        "--perms", "1777", "--size", "2000", "--tmpfs", "/tmp",
        "--perms", "1777", "--size", "2000", "--tmpfs", "/var/tmp",
        "--perms", "0755", "--size", "65536", "--tmpfs", "/run",
        "--perms", "0755", "--size", "1000", "--tmpfs", "/home",
        "--perms", "0700", "--dir", "/home/app",
        "--perms", "0700", "--size", "4096", "--tmpfs", "/root",
        # /tmp and /root are private already; /opt/closed is out of the app's reach
        "--perms", "0000", "--size", "4096", "--tmpfs", "/srv/apps",
        "--perms", "0000", "--size", "4096", "--tmpfs", "/srv/suite",
        "--chdir", "/home/app",
    ]  # fmt: skip


def test_bwrap_shows_the_suites_installation_where_a_private_folder_would_cover_it() -> None:
    """A checkout under /tmp or /home (its interpreter's environment within it): apps run from
    it, so it is bound again, read-only, over the private folder; a suite folder inside it that
    an app could reach is still covered."""
    args = bwrap_args(
        hidden=[Path("/home/op/binder/home"), Path("/tmp/other")],
        sizes=Sizes(home=1000, tmp=2000, shm=3000),
        reachable=lambda p: True,
        shown=[Path("/home/op/binder"), Path("/home/op/binder/.venv"), Path("/usr")],
    )
    tail = args[args.index("/root") + 1 :]
    assert tail == [
        "--ro-bind", "/home/op/binder", "/home/op/binder",
        "--perms", "0000", "--size", "4096", "--tmpfs", "/home/op/binder/home",
        "--chdir", "/home/app",
    ]  # fmt: skip


def test_a_trusted_app_of_another_user_runs_from_a_folder_closed_to_it(tmp_path: Path) -> None:
    """The direct form's ``--reach``: an unsandboxed app run as the apps' user runs the suite's
    code from a checkout under a 0700 folder (a ``mktemp -d`` clone), shown in a mount namespace
    of the app's own; without it the app cannot even be started."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the helper switches to another user and makes a mount namespace")
    closed = Path(tempfile.mkdtemp(prefix="binder-closed-"))  # 0700, owned by root
    try:
        checkout = closed / "checkout"
        checkout.mkdir()
        checkout.chmod(0o755)
        app = checkout / "app"
        app.write_text("#!/bin/sh\necho running as $(id -u)\n")
        app.chmod(0o755)
        user = AppUser("app", 260003, 260003)
        reach = closed_to_others([checkout])
        assert reach == [checkout]
        shut = subprocess.run([*direct_words(None, user), str(app)], capture_output=True, text=True)
        assert shut.returncode == 126, shut  # what --reach is for
        run = subprocess.run(
            [*direct_words(None, user, reach), str(app)], capture_output=True, text=True
        )
        assert (run.returncode, run.stdout) == (0, "running as 260003\n"), run
        assert closed.stat().st_mode & 0o777 == 0o700  # the host's folder as it was
        assert str(closed) not in Path("/proc/self/mountinfo").read_text()
    finally:
        shutil.rmtree(closed)
