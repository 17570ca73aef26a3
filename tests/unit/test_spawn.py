"""Apps are spawned with exactly what they are given: their own session, folder, environment and
output, no descriptor of the server, every signal at its default; a spawn that cannot start says
why; and the server's event loop runs on while a child starts, however slow its exec."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from services.deploy_kubernetes.backends.local import spawn as spawning

REPORT = """
import json, os, signal, sys
fds = [fd for fd in range(64) if fd != 3 and os.path.exists(f"/proc/self/fd/{fd}")]
print(json.dumps({
    "sid": os.getsid(0), "pid": os.getpid(), "cwd": os.getcwd(), "env": dict(os.environ),
    "fds": fds, "stdin": os.readlink("/proc/self/fd/0"),
}), flush=True)
"""


@pytest.fixture(autouse=True)
def _posix_spawn() -> None:
    if spawning._LIBC is None:
        pytest.fail("the C library here has no posix_spawn_file_actions_addclosefrom_np")


def _wait(child: spawning.Child, seconds: float = 20) -> int | None:
    deadline = time.monotonic() + seconds
    while child.poll() is None:
        if time.monotonic() > deadline:
            os.kill(child.pid, signal.SIGKILL)
            pytest.fail("the child did not end")
        time.sleep(0.01)
    return child.returncode


def test_child_gets_only_what_it_is_given(tmp_path: Path) -> None:
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


def test_child_starts_with_every_signal_at_its_default(tmp_path: Path) -> None:
    """The server ignores SIGPIPE (Python does): its apps must not. ``posix_spawn`` resets every
    signal (one the server ignores, SIGUSR1 here, too) and the mask of blocked ones."""
    out = tmp_path / "out.log"
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
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
    assert int(masks["SigIgn"], 16) & standard == 0
    assert int(masks["SigBlk"], 16) & standard == 0


def test_program_is_found_on_the_given_path(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    folder = Path(sys.executable).parent
    env = {"PATH": f"/nonexistent:{folder}"}
    child = spawning.spawn(
        [Path(sys.executable).name, "-c", "print('hi')"], env=env, cwd=tmp_path, output=out
    )
    assert _wait(child) == 0
    assert out.read_text() == "hi\n"


def test_exit_code_and_signal_are_reported(tmp_path: Path) -> None:
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
def test_what_cannot_start_raises(tmp_path: Path, argv: list[str], folder: str) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        spawning.spawn(
            argv, env={"PATH": os.environ["PATH"]}, cwd=tmp_path / folder, output=tmp_path / "o"
        )
    assert caught.value.errno == 2  # ENOENT


def test_the_event_loop_runs_on_while_a_child_is_slow_to_exec(tmp_path: Path) -> None:
    """What this spawn exists for: a child that takes its time to reach its exec (here its stdin
    is a FIFO that a process of its own opens for writing only after HELD seconds) holds up the
    worker thread that spawns it, and nothing else: a heartbeat on the event loop ticks on."""
    held = 0.5
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    out = tmp_path / "out.log"
    env = {"PATH": os.environ["PATH"]}
    start = functools.partial(
        spawning.spawn, ["cat"], env=env, cwd=tmp_path, output=out, stdin=fifo
    )

    async def main() -> tuple[list[float], spawning.Child]:
        beats: list[float] = []

        async def heartbeat() -> None:
            while True:
                beats.append(time.monotonic())
                await asyncio.sleep(0.01)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(heartbeat)
            child = await anyio.to_thread.run_sync(start)
            tasks.cancel_scope.cancel()
        return beats, child

    began = time.monotonic()
    feeder = subprocess.Popen(["/bin/sh", "-c", f'sleep {held}; echo fed > "$0"', str(fifo)])
    try:
        beats, child = anyio.run(main)
    finally:
        feeder.wait(timeout=30)
    assert time.monotonic() - began >= held  # the spawn really waited for its child
    assert _wait(child) == 0
    assert out.read_text() == "fed\n"
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert len(beats) >= 20, f"{len(beats)} heartbeats in {held} s: the event loop was held"
    assert max(gaps) < 0.2, f"the event loop stood still for {max(gaps):.3f} s"
