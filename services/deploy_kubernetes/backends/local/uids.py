"""The uids (and gids: the same number) handed to sandboxed apps, one per app, from
``[deploy.local] uid_range``; none has a passwd entry.

A uid is never handed out while any process of the host runs as it: one this suite gave an app,
or one of someone else (another suite on the same range, a session that borrowed a uid). The
processes of the host are looked at (:func:`uids_in_use`, a few ms) off the launch path, when the
slots are refilled; a uid is then reserved with its slot. The search starts at an offset of the
suite's own in the range, so two suites sharing it take uids far apart.

Between the deploy servers of one suite a uid is also claimed (:mod:`.claims`): a parked slot's
uid is no process's yet, so the look at the host's processes cannot keep two servers apart.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable

from common.errors import ConfigError
from services.deploy_kubernetes.backends.local.claims import Claims, uid_claim


def parse_range(text: str) -> range:
    """``"200000-299999"`` as a range of uids; ``ConfigError`` naming the key when it is not one
    (or holds uid 0 or uids of the system's usual accounts, below 1000)."""
    found = re.fullmatch(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", text)
    if not found or not 1000 <= int(found.group(1)) <= int(found.group(2)) < 2**32 - 1:
        raise ConfigError(
            f"deploy.local.uid_range: {text!r} is not a range of uids FIRST-LAST of 1000 or above"
        )
    return range(int(found.group(1)), int(found.group(2)) + 1)


def uids_in_use(within: range) -> set[int]:
    """The real, effective and saved uids within ``within`` of every process of the host."""
    out: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                text = fh.read()
        except OSError:  # gone meanwhile
            continue
        start = text.find(b"\nUid:")
        if start < 0:
            continue
        for word in text[start + 5 : text.find(b"\n", start + 5)].split()[:3]:
            if int(word) in within:
                out.add(int(word))
    return out


class Uids:
    """The uids of the range this suite holds (reserved for a slot or an app's)."""

    def __init__(
        self,
        within: range,
        suite: str,
        *,
        claims: Claims | None = None,
        unused: Callable[[int], bool] | None = None,
    ) -> None:
        """``claims``: shared with the suite's other deploy servers (None: this server alone
        uses the range); ``unused(uid)``: whether a uid whose claim a dead server left is
        free again (no process and no app of the suite has it)."""
        self.range = within
        self._claims = claims
        self._unused = unused
        self._held: set[int] = set()
        self._next = int(hashlib.sha256(suite.encode()).hexdigest(), 16) % len(within)
        self._lock = threading.Lock()

    def hold(self, uid: int) -> bool:
        """Mark ``uid`` held (an app of an earlier server, found again); True when this server
        holds its claim too (it was abandoned, or there is no claim to share)."""
        with self._lock:
            self._held.add(uid)
        return self._claims is None or self._claims.take(uid_claim(uid))

    def take(self, busy: set[int]) -> int:
        """A uid that is neither held (here or by another deploy server of the suite) nor in
        ``busy`` (the host's, :func:`uids_in_use`), held from now on."""
        with self._lock:
            for step in range(len(self.range)):
                uid = self.range[(self._next + step) % len(self.range)]
                if uid not in self._held and uid not in busy and self._claim(uid):
                    self._held.add(uid)
                    self._next = (self._next + step + 1) % len(self.range)
                    return uid
        raise ConfigError(
            f"deploy.local.uid_range: every uid of {self.range.start}-{self.range.stop - 1} is "
            "in use; widen the range"
        )

    def _claim(self, uid: int) -> bool:
        if self._claims is None:
            return True
        unused = self._unused
        return self._claims.take(
            uid_claim(uid), unused=(lambda: unused(uid)) if unused else lambda: False
        )

    def free(self, uid: int) -> None:
        with self._lock:
            self._held.discard(uid)
        if self._claims is not None:
            self._claims.release(uid_claim(uid))

    def held(self) -> set[int]:
        with self._lock:
            return set(self._held)
