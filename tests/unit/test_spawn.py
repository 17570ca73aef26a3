"""Apps are spawned with exactly what they are given: their own session, folder, environment and
output, no descriptor of the server, every signal at its default; a spawn that cannot start says
why. Both ways of spawning keep this: ``posix_spawn`` and the ``subprocess`` fallback."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from common import spawn as spawning

REPORT = """
import json, os, signal, sys
fds = [fd for fd in range(64) if fd != 3 and os.path.exists(f"/proc/self/fd/{fd}")]
print(json.dumps({
    "sid": os.getsid(0), "pid": os.getpid(), "cwd": os.getcwd(), "env": dict(os.environ),
    "fds": fds, "stdin": os.readlink("/proc/self/fd/0"),
}), flush=True)
"""


@pytest.fixture(params=["posix_spawn", "subprocess"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "subprocess":
        monkeypatch.setattr(spawning, "_LIBC", None)
    elif spawning._LIBC is None:
        pytest.fail("the C library here has no posix_spawn_file_actions_addclosefrom_np")
    return str(request.param)


def _wait(child: spawning.Spawned, seconds: float = 20) -> int | None:
    deadline = time.monotonic() + seconds
    while child.poll() is None:
        if time.monotonic() > deadline:
            os.kill(child.pid, signal.SIGKILL)
            pytest.fail("the child did not end")
        time.sleep(0.01)
    return child.returncode


def test_child_gets_only_what_it_is_given(way: str, tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    out.write_text("earlier line\n")
    kept = [os.open(tmp_path / "server-secret", os.O_CREAT | os.O_RDWR) for _ in range(4)]
    for fd in kept:  # descriptors of the server, even inheritable ones (3 among them)
        os.set_inheritable(fd, True)
    try:
        env = {"PATH": os.environ["PATH"], "ONLY": "this"}
        child = spawning.spawn([sys.executable, "-c", REPORT], env=env, cwd=tmp_path, output=out)
        assert _wait(child) == 0
    finally:
        for fd in kept:
            os.close(fd)
    earlier, line = out.read_text().splitlines()
    report = json.loads(line)
    assert earlier == "earlier line"  # appended to
    assert report["sid"] == report["pid"] == child.pid  # a session of its own
    assert report["cwd"] == str(tmp_path)
    assert {k: v for k, v in report["env"].items() if k != "LC_CTYPE"} == env
    assert report["fds"] == [0, 1, 2]  # fd 3, if any, is the child's own (its first open)
    assert report["stdin"] == "/dev/null"


def test_child_starts_with_every_signal_at_its_default(way: str, tmp_path: Path) -> None:
    """The server ignores SIGPIPE (Python does): its apps must not. ``posix_spawn`` resets every
    signal and the mask of blocked ones; the fallback resets what Python itself ignores (a
    signal ignored by whatever started the server, SIGINT in a background job, stays so)."""
    out = tmp_path / "out.log"
    extra = way == "posix_spawn"
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN if extra else signal.SIG_DFL)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2} if extra else set())
    try:
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
        env = {"PATH": os.environ["PATH"]}
        grep = ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]  # grep's own dispositions
        assert _wait(spawning.spawn(grep, env=env, cwd=tmp_path, output=out)) == 0
    finally:
        signal.signal(signal.SIGUSR1, old)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    masks = dict(line.split(":") for line in out.read_text().splitlines())
    standard = (1 << 31) - 1  # signals 1 to 31 (the C library keeps 32 and 33 to itself)
    pythons = 1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)
    assert int(masks["SigIgn"], 16) & (standard if extra else pythons) == 0
    assert int(masks["SigBlk"], 16) & standard == 0


def test_program_is_found_on_the_given_path(way: str, tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    folder = Path(sys.executable).parent
    env = {"PATH": f"/nonexistent:{folder}"}
    child = spawning.spawn(
        [Path(sys.executable).name, "-c", "print('hi')"], env=env, cwd=tmp_path, output=out
    )
    assert _wait(child) == 0
    assert out.read_text() == "hi\n"


def test_exit_code_and_signal_are_reported(way: str, tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    env = {"PATH": os.environ["PATH"]}
    code = spawning.spawn(
        [sys.executable, "-c", "raise SystemExit(3)"], env=env, cwd=tmp_path, output=out
    )
    assert _wait(code) == 3
    sleeper = spawning.spawn(["sleep", "30"], env=env, cwd=tmp_path, output=out)
    os.kill(sleeper.pid, signal.SIGTERM)
    assert _wait(sleeper) == -signal.SIGTERM


@pytest.mark.parametrize(
    ("argv", "folder"),
    [(["no-such-program-here"], "."), (["/nonexistent/program"], "."), (["true"], "missing")],
)
def test_what_cannot_start_raises(way: str, tmp_path: Path, argv: list[str], folder: str) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        spawning.spawn(
            argv, env={"PATH": os.environ["PATH"]}, cwd=tmp_path / folder, output=tmp_path / "o"
        )
    assert caught.value.errno == 2  # ENOENT, in both ways
