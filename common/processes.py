"""Processes: looking at them through /proc (alive or not, when they started) and waiting for their
end through a pidfd (spawning apps is the local backend's own)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone or a zombie.

    With the pid, it tells a process apart from a later one that reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def alive(pid: int) -> bool:
    """True while the process runs (a zombie counts as gone)."""
    return start_time(pid) is not None


def session_leaders_with(name: str, value: str) -> dict[int, dict[str, str]]:
    """Session leaders (a process started with ``start_new_session``) whose environment holds
    ``name=value``: pid -> their environment. Processes we may not read are passed over."""
    wanted = f"{name}={value}".encode()
    out: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
            if wanted not in raw.split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" or int(fields[3]) != int(entry.name):  # field 6: the session id
            continue
        env = dict(
            item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item
        )
        out[int(entry.name)] = env
    return out


async def exited(pid: int, *, started: int | None = None) -> None:
    """Return once process ``pid`` has ended (at once when it is gone, or when ``started`` is
    given and the pid now belongs to a later process). The kernel says so through a pidfd that
    the event loop watches: nothing polls, whoever the process's parent is."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if started is None or start_time(pid) == started:
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)
