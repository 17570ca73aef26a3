"""Claims: the slot numbers and uids a deploy server holds, exclusive among the deploy servers of
the suite on this host (``[deploy] servers = N``, or two started by hand on one home).

Each server keeps what it holds in memory, but two servers do not see each other's memory: a
parked slot's uid is not yet any process's (its helper runs as root until the launch), and a
slot being made has a cgroup without a process in it. Without a shared claim two servers could
hand one uid to two apps, make one slot number twice, or (a server starting) remove the slot
another is making.

A claim is a file ``slot-<n>`` or ``uid-<n>`` in a root-only folder of the suite's state, made
with ``O_EXCL`` and locked (``flock``) by the server holding it for as long as it does: while it
makes a slot, keeps it parked, and knows the app launched in it. Only the lock's holder removes
the file (:meth:`Claims.release`); a server that finds a claim's file unlocked (its holder
died, and the lock went with it) takes it over only when the caller's ``unused`` check says
nothing of it is left (a dead server's app runs on), or adopts it for an app it found again.
A lock costs one ``open`` and one ``flock`` (~10 µs), on the slot-making path only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from services.deploy_kubernetes.backends.local.folders import private_dir

NAME_RE = re.compile(r"^(slot|uid)-([0-9]{1,10})$")


def slot_claim(n: int) -> str:
    return f"slot-{n}"


def uid_claim(uid: int) -> str:
    return f"uid-{uid}"


class Claims:
    """The claims this server holds, in ``folder`` (shared by the suite's servers)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._held: dict[str, int] = {}
        """Each held claim's locked file descriptor."""
        self._lock = threading.Lock()

    def prepare(self) -> None:
        private_dir(self.folder, 0o700)

    def take(self, name: str, *, unused: Callable[[], bool] | None = None) -> bool:
        """Hold claim ``name``; True when this server holds it now (or did already). A claim
        another live server holds is refused; an abandoned one (unlocked) is taken when
        ``unused`` says nothing of it is left, or always when ``unused`` is None (adopting
        what the caller knows to be its own: an app it found again)."""
        with self._lock:
            if name in self._held:
                return True
            fd = self._locked(name, unused)
            if fd is None:
                return False
            self._held[name] = fd
            return True

    def _locked(self, name: str, unused: Callable[[], bool] | None) -> int | None:
        path = self.folder / name
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        while True:
            try:
                fd, made = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
            except FileExistsError:
                try:
                    fd, made = os.open(path, flags), False
                except FileNotFoundError:
                    continue  # released meanwhile: make it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None  # another server holds it
            if not _linked(fd, path):  # its holder released it between our open and our lock
                os.close(fd)
                continue
            if not made and unused is not None and not unused():
                os.close(fd)  # abandoned, but what it stands for is still there
                return None
            return fd

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._held

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def release(self, name: str) -> None:
        """Give claim ``name`` up (its file removed, then unlocked); nothing when not held."""
        with self._lock:
            fd = self._held.pop(name, None)
            if fd is None:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / name)  # ours: only a lock's holder removes the file
            os.close(fd)

    def abandoned(self) -> list[str]:
        """Take every claim no live server holds (their servers died); the caller keeps what
        stands for something found and releases the rest."""
        try:
            names = sorted(p.name for p in self.folder.iterdir() if NAME_RE.match(p.name))
        except FileNotFoundError:
            return []
        return [name for name in names if not self.holds(name) and self.take(name)]

    def close(self) -> None:
        """Unlock every claim without removing it (the server stops; its apps run on)."""
        with self._lock:
            held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)


def _linked(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not removed, nor replaced)."""
    try:
        seen = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (seen.st_dev, seen.st_ino) == (mine.st_dev, mine.st_ino)
