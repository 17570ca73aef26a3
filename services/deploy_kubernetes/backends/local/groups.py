"""A sandboxed app's process group (its cgroup) as a whole: who its shim is, how it is ended,
why it ended, and the watch for its exit or an OOM kill in it.

Everything read here is the kernel's (cgroup membership and counters, ``/proc/<pid>/status``) or
the shim's (the status file, root's, in the suite's own folder): nothing an app writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import anyio
from asyncinotify import Inotify, Mask

from common.processes import alive
from services.deploy_kubernetes.backends.local.cgroups import Group

KILL_ROUNDS_SECONDS = 5.0


def _status_ids(pid: int) -> tuple[int, int] | None:
    """(real uid, namespace inode of the network) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            text = fh.read()
        net = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
    start = text.find(b"\nUid:")
    return (int(text[start + 5 :].split()[0]), net) if start >= 0 else None


def members(group: Group) -> dict[int, tuple[int, int]]:
    """pid -> (uid, network namespace inode) of the group's processes, each read from /proc and
    kept only when the process is still in the group after the read (a pid reused meanwhile by a
    process outside is not taken for one of the app's)."""
    out: dict[int, tuple[int, int]] = {}
    for pid in group.procs():
        ids = _status_ids(pid)
        if ids is not None:
            out[pid] = ids
    if out:
        still = set(group.procs())
        out = {pid: ids for pid, ids in out.items() if pid in still}
    return out


def shim_of(group: Group) -> int | None:
    """The shim: the group's one root process (an app's processes run as its own uid, with no
    way back to root)."""
    return next((pid for pid, (uid, _) in members(group).items() if uid == 0), None)


def others(group: Group, shim: int | None) -> list[int]:
    return [pid for pid in group.procs() if pid != shim]


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the kernel's list), none when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(word) for word in fh.read().split()]
    except OSError:
        return []


async def end_group(group: Group, shim: int | None, *, grace: float) -> None:
    """End every process of the group: SIGTERM to all but the shim at once; up to ``grace``
    seconds for the app's own first process (the shim's child) to end; then SIGKILL, the group
    frozen for each round, until only the shim is left. The shim then reaps them and ends
    (killed after a second).

    The grace is the app's own, not its planted processes': bwrap's pid 1 waits for every
    process of the namespace, so one that ignores SIGTERM would otherwise hold the stop for the
    whole grace."""
    if not group.exists():
        return
    main = children(shim) if shim is not None else []
    if await anyio.to_thread.run_sync(lambda: group.signal(signal.SIGTERM, spare=shim)):
        with anyio.move_on_after(grace):
            while others(group, shim) and (  # noqa: ASYNC110 - cgroup v1 tells of no emptiness
                not main or any(alive(pid) for pid in main)
            ):
                await anyio.sleep(0.01)
    deadline = time.monotonic() + KILL_ROUNDS_SECONDS
    while others(group, shim) and time.monotonic() < deadline:
        await anyio.to_thread.run_sync(lambda: group.signal(signal.SIGKILL, spare=shim))
        await anyio.sleep(0.002)
    with anyio.move_on_after(1.0):
        while group.procs():  # noqa: ASYNC110 - as above
            await anyio.sleep(0.005)
    if group.procs():  # the shim did not end: end it too
        await anyio.to_thread.run_sync(lambda: group.signal(signal.SIGKILL))


def exit_reason(*, group: Group, memory: str, status_file: Path, shim_code: int | None) -> str:
    """Why an app ended: an OOM kill in its group (the kernel's counter), else what the shim
    wrote of its child (the app under bwrap), else how the shim itself ended."""
    if group.oom_kills():
        return f"out of memory (limit {memory})"
    try:
        kind, _, text = status_file.read_text().strip().partition(" ")
        code = int(text)
    except (OSError, ValueError):
        kind, code = "", -1
    if kind == "signal" or (kind == "exit" and 128 < code < 128 + signal.NSIG):
        # bwrap (and a shell) reports an app killed by signal N as 128+N
        number = code if kind == "signal" else code - 128
        with contextlib.suppress(ValueError):
            return f"process was killed by signal {signal.Signals(number).name}"
    if kind == "exit":
        return f"process exited with code {code}"
    if shim_code is not None and shim_code < 0:
        return f"process was killed by signal {signal.Signals(-shim_code).name}"
    return "process ended (its exit status is unknown)"


async def oom_killed(group: Group) -> None:
    """Return once the kernel has killed a process of the group for want of memory (at once
    when it did already). v1: an eventfd registered on ``memory.oom_control``; v2: the
    file-modified events of ``memory.events``."""
    if group.version == 1:
        await _oom_v1(group)
        return
    with Inotify() as inotify:
        inotify.add_watch(group.oom_file(), Mask.MODIFY)
        while not group.oom_kills():
            await inotify.get()


async def _oom_v1(group: Group) -> None:
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    control = -1
    try:
        control = os.open(group.oom_file(), os.O_RDONLY | os.O_CLOEXEC)
        fd = os.open(group.oom_file().with_name("cgroup.event_control"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, f"{efd} {control}".encode())
        finally:
            os.close(fd)
        while not group.oom_kills():
            await anyio.wait_readable(efd)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(efd)
            if not group.exists():  # removed: the kernel signals the eventfd then too
                await anyio.sleep_forever()
    finally:
        os.close(efd)
        if control >= 0:
            os.close(control)
