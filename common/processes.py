"""Looking at other processes through /proc: alive or not, and when they started."""

from __future__ import annotations

from pathlib import Path


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
