"""Slots: what a sandboxed launch takes, made ahead of it.

A slot is a cgroup (``slot-<n>``, :mod:`.cgroups`), a network namespace (slot ``n`` of
:mod:`.network`), a uid (:mod:`.uids`) and a ``binder-sandbox --park`` helper already in both,
with the app's sandbox (bwrap, as the uid) made around a waiter, waiting on a pipe for its launch
request (:mod:`.helper`). A launch is then a rename (or an extended attribute), a few limit
writes and one write to that pipe: ~0.3 ms of the server.

Why ahead: joining a cgroup costs ~10 ms in cgroup v1 (an RCU grace period, unless another join
happened in the last few ms), a network namespace 4-12 ms to make and bwrap's namespaces and
mounts 1-5 ms (measured here); made on the launch path they would cost about 20 ms per launch,
four times the sandbox's budget. The
pool (``[deploy.local] sandbox_slots``, 10 by default: a burst of 10 launches at today's speed)
is refilled in the background by a supervised loop (:meth:`Slots.run`) while no app starts; a
launch that finds it empty makes a slot on its own path: slower, never failed for want of one.

A slot number is claimed (:mod:`.claims`) before anything of the slot is made: the suite's other
deploy servers then neither make the same slot nor remove it while it is being made.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from loguru import logger

from services.deploy_kubernetes.backends.local.cgroups import Cgroups, Group, Limits
from services.deploy_kubernetes.backends.local.claims import Claims, slot_claim
from services.deploy_kubernetes.backends.local.helper import park_words
from services.deploy_kubernetes.backends.local.network import Netns, Network
from services.deploy_kubernetes.backends.local.spawn import Child
from services.deploy_kubernetes.backends.local.uids import Uids, uids_in_use

REFILL_QUIET_SECONDS = 1.0
SETTLE_SECONDS = 0.1
"""How long the refill waits once the apps that were starting are ready."""
UIDS_LOOK_SECONDS = 30.0
PARK_LIMITS = Limits(memory=64 << 20, pids=16)
"""What a parked slot's cgroup allows until its launch writes the template's limits (the
helper, bwrap's two processes and the waiter)."""


class SlotError(Exception):
    """A slot could not be made."""


@dataclass
class Slot:
    n: int
    netns: Netns
    group: Group
    uid: int
    helper: Child
    """The parked helper: after the launch, the app's shim."""
    request: int
    """The write end of the helper's stdin: the launch request, then end of file."""

    def discard(self) -> None:
        """End of file without a request: the parked helper exits, nothing done."""
        with contextlib.suppress(OSError):
            os.close(self.request)


class Slots:
    """The suite's parked slots: made by :meth:`make` (blocking, ~20 ms), kept ``size`` ready."""

    def __init__(
        self,
        *,
        cgroups: Cgroups,
        network: Network,
        uids: Uids,
        size: int,
        claims: Claims | None = None,
    ) -> None:
        """``claims``: shared with the suite's other deploy servers (None: no other server)."""
        self.cgroups, self.network, self.uids = cgroups, network, uids
        self.claims = claims
        self.size = size
        self.sandbox: list[str] = []
        """bwrap and its arguments, the same for every app (none: the waiter alone)."""
        self.reach: list[Path] = []
        """Folders the apps run from that their users cannot reach (:func:`closed_to_others`)."""
        self._ready: list[Slot] = []
        self._numbers: set[int] = set()
        """Slot numbers in use: parked, an app's, or being made."""
        self._next = 0
        self._lock = threading.Lock()
        self._wanted: anyio.Event | None = None
        self.made = 0
        """Slots made so far (on the launch path or ahead)."""
        self._starting: set[str] = set()
        self._settled: anyio.Event | None = None
        self._busy_at: tuple[float, set[int]] | None = None

    def hold_number(self, n: int) -> bool:
        """Slot ``n`` is an app's (of an earlier server, found again); True when this server
        holds its claim too (it was abandoned, or there is no claim to share)."""
        with self._lock:
            self._numbers.add(n)
        return self.claims is None or self.claims.take(slot_claim(n))

    def holds_claim(self, n: int) -> bool:
        """Whether this server may remove slot ``n``'s namespace: it holds the slot's claim
        (taking it over when it was abandoned), or no other server shares the slots."""
        return self.claims is None or self.claims.take(slot_claim(n))

    def release_number(self, n: int) -> None:
        with self._lock:
            self._numbers.discard(n)
        if self.claims is not None:
            self.claims.release(slot_claim(n))

    def _number(self) -> int:
        """The next free slot number, going round the network: a number comes back only after
        the others (a released namespace's connections are long gone from conntrack by then);
        claimed before it is answered."""
        with self._lock:
            for step in range(self.network.slots):
                n = (self._next + step) % self.network.slots
                if n not in self._numbers and self._claim(n):
                    self._numbers.add(n)
                    self._next = n + 1
                    return n
        raise SlotError(f"every address of {self.network.network} is an app's")

    def _claim(self, n: int) -> bool:
        if self.claims is None:
            return True

        def unused() -> bool:  # a dead server's claim: free once nothing of its slot is left
            return not self.cgroups.slot(n).exists() and not self.network.netns(n).path.exists()

        return self.claims.take(slot_claim(n), unused=unused)

    def take(self) -> Slot | None:
        """A parked slot whose helper still waits, or None when there is none."""
        while True:
            with self._lock:
                slot = self._ready.pop(0) if self._ready else None
            if self._wanted is not None:
                self._wanted.set()
            if slot is None or slot.helper.poll() is None:
                return slot
            logger.warning("a parked helper ended before its launch; dropping slot {}", slot.n)
            self.drop(slot)

    def make(self, busy: set[int] | None = None) -> Slot:
        """A new slot (blocking): cgroup, namespace, uid, helper joined. ``busy``: the host's
        uids in use when known (else looked up now)."""
        n = self._number()
        while self.cgroups.slot(n).exists() or self.network.netns(n).path.exists():
            n = self._number()  # something of slot n is left (a dead server's): keep it held
        try:
            uid = self.uids.take(self._busy() if busy is None else busy)
        except BaseException:
            self.release_number(n)
            raise
        group: Group | None = None
        netns: Netns | None = None
        try:
            group = self.cgroups.make_slot(n, PARK_LIMITS)
            netns = self.network.make(n)
            words = park_words(
                group.paths(), netns.path, uid=uid, sandbox=self.sandbox, reach=self.reach
            )
            helper, request = _park(words)
        except BaseException:
            if netns is not None:
                self.network.remove(netns)
            if group is not None:
                with contextlib.suppress(OSError):
                    group.remove()
            self.uids.free(uid)
            self.release_number(n)
            raise
        self.made += 1
        return Slot(n=n, netns=netns, group=group, uid=uid, helper=helper, request=request)

    def drop(self, slot: Slot) -> None:
        """Undo a slot that will not be launched (blocking): its helper and sandbox killed."""
        slot.discard()
        slot.group.signal(signal.SIGKILL)
        slot.helper.wait()
        with contextlib.suppress(OSError):
            slot.group.remove()  # waits for the sandbox's processes on their way out
        self.network.remove(slot.netns)
        self.uids.free(slot.uid)
        self.release_number(slot.n)

    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    async def run(self) -> None:
        """Keep ``size`` slots parked, made one at a time in a worker thread while no launch's
        app is starting (:meth:`starting`; a pool's instances are started for no one waiting,
        so they hold nothing back: a busy pool would otherwise leave the slots spent for the
        next burst), or, when launches' apps start all the while, one per
        :data:`REFILL_QUIET_SECONDS`: a slot's ~15-20 ms of CPU, spent while an app starts on
        the same two cores, slows its start (measured: 57 ms a launch when each launch was
        followed by its refill; 22 ms when the refill waited for a second without launches,
        which a launch every 0.3 s never gave, so every launch made its own slot). Once the
        starting apps are ready, :data:`SETTLE_SECONDS` more: their launches' last steps (the
        route, the record, the answer) come first (measured: a sandboxed launch cost 2-4 ms more
        than an unsandboxed one when the refill began at its app's readiness, none after)."""
        while True:
            while self.ready() < self.size:
                if self._starting:
                    self._settled = anyio.Event()
                    with anyio.move_on_after(REFILL_QUIET_SECONDS):
                        await self._settled.wait()
                    if self._settled.is_set():
                        await anyio.sleep(SETTLE_SECONDS)
                slot = await anyio.to_thread.run_sync(self.make)
                with self._lock:
                    self._ready.append(slot)
            self._wanted = anyio.Event()
            await self._wanted.wait()

    def starting(self, dep_id: str, *, started: bool) -> None:
        """A launch's app is starting (until it is ready, failed or stopped): someone waits."""
        if started:
            self._starting.add(dep_id)
            return
        self._starting.discard(dep_id)
        if not self._starting and self._settled is not None:
            self._settled.set()

    def _busy(self) -> set[int]:
        """The host's uids in use, looked at once per :data:`UIDS_LOOK_SECONDS` (a look reads
        every process's status: ~5 ms of CPU here)."""
        now = time.monotonic()
        if self._busy_at is None or now - self._busy_at[0] > UIDS_LOOK_SECONDS:
            self._busy_at = (now, uids_in_use(self.uids.range))
        return self._busy_at[1]

    def close(self) -> None:
        """Drop every parked slot (blocking)."""
        with self._lock:
            ready, self._ready = self._ready, []
        for slot in ready:
            self.drop(slot)


def _park(argv: list[str]) -> tuple[Child, int]:
    """Start a parked helper in a session of its own; return it and its stdin's write end once
    it said it joined and made the sandbox (``R``)."""
    stdin_r, stdin_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        pid = os.posix_spawn(
            argv[0],
            argv,
            {},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                (os.POSIX_SPAWN_DUP2, ready_w, 1),
                (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
            ],
            setsid=True,
            setsigmask=[],
            setsigdef=[
                s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)
            ],
        )
    except OSError:
        for fd in (stdin_r, stdin_w, ready_r, ready_w):
            os.close(fd)
        raise
    os.close(stdin_r)
    os.close(ready_w)
    helper = Child(pid)
    try:
        joined = os.read(ready_r, 1)
        said = _read_all(ready_r) if joined == b"F" else b""
    finally:
        os.close(ready_r)
    if joined != b"R":
        os.close(stdin_w)
        code = helper.wait()
        if said:  # the sandbox could not be set up: what bwrap said
            raise SlotError(f"the app's sandbox could not be made: {said.decode(errors='replace')}")
        raise SlotError(f"a parked helper could not join its cgroup and namespace (exit {code})")
    return helper, stdin_w


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).strip()
