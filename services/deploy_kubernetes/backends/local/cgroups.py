"""The sandboxed apps' cgroups, v1 (one directory per controller's hierarchy: memory, pids, cpu,
freezer) or v2 (one directory), under a parent of the suite's own (``binder-<suite>``).

A slot's cgroup is made ahead of its launch as ``slot-<n>`` (its parked helper joins it then:
:mod:`.slots`); the launch claims it for the deployment: in v1 its directories are renamed to the
deployment id, in v2 (which refuses a rename) the id is written in its ``trusted.binder_id``
extended attribute. Either is done by root alone, in a folder only root writes to: a cgroup
claimed for an id is the evidence that finds the app again after a restart, out of the app's
reach (its environment, files and process names are not looked at).

Every blocking call here is a few file operations on cgroupfs; the backend runs them in worker
threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.deploy_kubernetes.models import is_id

V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
ID_XATTR = "trusted.binder_id"
SLOT_RE = re.compile(r"^slot-([0-9]{1,9})$")
CPU_PERIOD_US = 100_000
FREEZE_SECONDS = 5.0


class CgroupError(Exception):
    """The cgroups cannot be used as the sandbox needs (no memory controller, not writable)."""


def _read(path: Path) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def mounts(mountinfo: str) -> tuple[int, dict[str, Path]]:
    """``(1, {controller: mount point})`` where a v1 hierarchy has the memory controller, else
    ``(2, {"": the cgroup2 mount})``, from the text of ``/proc/self/mountinfo``."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields = after.split(" ")
        if len(fields) < 3:
            continue
        mount = Path(before.split(" ")[4].replace("\\040", " "))
        if fields[0] == "cgroup":
            for option in fields[2].split(","):
                if option in V1_CONTROLLERS:
                    v1[option] = mount
        elif fields[0] == "cgroup2" and v2 is None:
            v2 = mount
    if "memory" in v1:
        missing = [c for c in V1_CONTROLLERS if c not in v1]
        if missing:
            raise CgroupError(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        return 1, v1
    if v2 is None:
        raise CgroupError("no cgroup hierarchy with the memory controller is mounted")
    return 2, {"": v2}


@dataclass(frozen=True)
class Limits:
    """What a template's ``limits`` set on its app's cgroup."""

    memory: int
    """Bytes of memory (and no swap) over the whole process tree."""
    pids: int
    cpu_millis: int | None = None
    """Thousandths of a core; None: no quota."""


@dataclass(frozen=True)
class Group:
    """The cgroup of one slot or app: its directory in each hierarchy (``""`` in v2)."""

    version: int
    dirs: dict[str, Path]

    def _dir(self, controller: str) -> Path:
        return self.dirs[controller if self.version == 1 else ""]

    def paths(self) -> list[str]:
        """The directories a helper joins."""
        return [str(d) for d in self.dirs.values()]

    def exists(self) -> bool:
        """Whether any of its directories is there: one made or renamed half-way (v1) by a
        server killed meanwhile counts, so its name is not taken for a new slot."""
        return any(d.is_dir() for d in self.dirs.values())

    def procs(self) -> list[int]:
        """Every process in it (v1: the freezer's view, which holds all of them)."""
        try:
            text = _read(self._dir("freezer") / "cgroup.procs")
        except FileNotFoundError:
            return []
        return [int(word) for word in text.split()]

    def set_limits(self, limits: Limits) -> None:
        """The template's limits. A CPU quota may be exceeded in a burst by what the app left
        unused of it before, up to one period's quota (``cpu.cfs_burst_us``, ``cpu.max.burst``,
        where the kernel has them, 5.14 on): on average the app gets its share, and a start
        that runs a few threads at once is not throttled at every period (measured: JupyterLab
        under ``cpu = "1"`` was seen ready 37-47 ms later than alone without a burst, 9 ms
        with no quota at all)."""
        quota = (
            "max" if limits.cpu_millis is None else str(limits.cpu_millis * CPU_PERIOD_US // 1000)
        )
        burst = "0" if quota == "max" else quota
        if self.version == 1:
            self._v1_memory(limits.memory)
            _write(self._dir("pids") / "pids.max", str(limits.pids))
            _write(self._dir("cpu") / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(self._dir("cpu") / "cpu.cfs_quota_us", "-1" if quota == "max" else quota)
            with contextlib.suppress(FileNotFoundError):  # a kernel before 5.14
                _write(self._dir("cpu") / "cpu.cfs_burst_us", burst)
            return
        d = self._dir("")
        _write(d / "memory.max", str(limits.memory))
        with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to bound
            _write(d / "memory.swap.max", "0")
        _write(d / "pids.max", str(limits.pids))
        _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        with contextlib.suppress(FileNotFoundError):  # a kernel before 5.14
            _write(d / "cpu.max.burst", burst)

    def _v1_memory(self, memory: int) -> None:
        """``memory.limit_in_bytes`` may not pass ``memory.memsw.limit_in_bytes`` (EINVAL): the
        memsw bound (memory plus swap; where there is swap accounting) is raised first when the
        limit grows and lowered after it when it shrinks, to the same value: no swap."""
        d = self._dir("memory")
        memsw = d / "memory.memsw.limit_in_bytes"
        try:
            _write(d / "memory.limit_in_bytes", str(memory))
        except OSError as exc:
            if exc.errno != errno.EINVAL or not memsw.exists():
                raise
            _write(memsw, str(memory))
            _write(d / "memory.limit_in_bytes", str(memory))
        with contextlib.suppress(FileNotFoundError):
            _write(memsw, str(memory))

    def memory_limit(self) -> int | None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        try:
            text = _read(self._dir("memory") / name).strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        """Processes of the group the kernel killed for want of memory (its own counter)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            text = _read(self._dir("memory") / name)
        except FileNotFoundError:
            return 0
        counts = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
        return int(counts.get("oom_kill", "0")) + int(counts.get("oom_group_kill", "0"))

    def oom_file(self) -> Path:
        """The file whose changes tell of an OOM: v1 ``memory.oom_control`` (with an eventfd
        registered in ``cgroup.event_control``), v2 ``memory.events`` (a file-modified event)."""
        return self._dir("memory") / (
            "memory.oom_control" if self.version == 1 else "memory.events"
        )

    def freeze(self, frozen: bool, *, within: float = FREEZE_SECONDS) -> bool:
        """Freeze (no process runs or forks meanwhile) or thaw; a freeze waits up to ``within``
        seconds for it to take effect and says whether it did (in v1 a task in the middle of
        its exit, or in an uninterruptible sleep on a busy host, can hold FREEZING for seconds)."""
        d = self._dir("freezer")
        if self.version == 1:
            _write(d / "freezer.state", "FROZEN" if frozen else "THAWED")
        else:
            _write(d / "cgroup.freeze", "1" if frozen else "0")
        deadline = time.monotonic() + within
        while frozen and not self._frozen():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def _frozen(self) -> bool:
        d = self._dir("freezer")
        if self.version == 1:
            return _read(d / "freezer.state").strip() == "FROZEN"
        return "frozen 1" in _read(d / "cgroup.events")

    def member(self, pid: int) -> bool:
        """Whether process ``pid`` is in this group now (its ``/proc/<pid>/cgroup``)."""
        folder = self._dir("freezer")
        path = f"/{folder.parent.name}/{folder.name}"
        try:
            lines = _read(Path(f"/proc/{pid}/cgroup")).splitlines()
        except OSError:
            return False
        for line in lines:
            _, controllers, where = line.split(":", 2)
            if where == path and (
                "freezer" in controllers.split(",") if self.version == 1 else controllers == ""
            ):
                return True
        return False

    def signal(self, sig: int, *, spare: int | None = None) -> int:
        """Send ``sig`` to every process but ``spare``; returns how many got it. The group is
        frozen meanwhile when it freezes within a moment (nothing forks between the read of its
        members and the signals); each process is signalled through a pidfd opened before its
        membership is checked, so a pid reused meanwhile by a process outside is never hit."""
        self.freeze(True, within=0.5)
        sent = 0
        try:
            for pid in self.procs():
                if pid == spare:
                    continue
                try:
                    fd = os.pidfd_open(pid)
                except OSError:  # gone
                    continue
                try:
                    if self.member(pid):
                        signal.pidfd_send_signal(fd, sig)
                        sent += 1
                except ProcessLookupError:
                    continue
                finally:
                    os.close(fd)
        finally:
            self.freeze(False)
        return sent

    def remove(self) -> None:
        """Remove its directories (once no process is left in them)."""
        for path in self.dirs.values():
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:  # EBUSY: a process on its way out
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)


def _busy(group: Group) -> bool:
    """Whether a process is in any of the group's directories (each hierarchy's own view)."""
    for path in group.dirs.values():
        with contextlib.suppress(FileNotFoundError):
            if _read(path / "cgroup.procs").split():
                return True
    return False


class Cgroups:
    """The suite's cgroup parent in each hierarchy: ``<mount>/<parent>``."""

    def __init__(self, version: int, mounted: dict[str, Path], parent: str) -> None:
        self.version = version
        self.roots = {c: mount / parent for c, mount in mounted.items()}
        if version == 1:
            self.roots = {c: self.roots[c] for c in V1_CONTROLLERS}

    @classmethod
    def of_host(cls, parent: str) -> Cgroups:
        version, mounted = mounts(_read(Path("/proc/self/mountinfo")))
        return cls(version, mounted, parent)

    def prepare(self) -> None:
        """Make the parent directories (root's, 0755); in v2 hand the controllers down to its
        children (the parent itself holds no process)."""
        for root in self.roots.values():
            root.mkdir(mode=0o755, exist_ok=True)
        if self.version == 2:
            root = self.roots[""]
            wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
            for folder in (root.parent, root):
                enabled = _read(folder / "cgroup.subtree_control").split()
                if not set(V2_CONTROLLERS) <= set(enabled):
                    _write(folder / "cgroup.subtree_control", wanted)

    def _group(self, name: str) -> Group:
        return Group(self.version, {c: root / name for c, root in self.roots.items()})

    def slot(self, n: int) -> Group:
        return self._group(f"slot-{n}")

    def make_slot(self, n: int, limits: Limits) -> Group:
        """Slot ``n``'s cgroup with ``limits`` (in v2 an OOM kill takes the whole group); what
        was made of it is removed again when it cannot be made whole."""
        group = self.slot(n)
        try:
            for path in group.dirs.values():
                os.mkdir(path, 0o755)
            group.set_limits(limits)
            if self.version == 2:
                _write(group.dirs[""] / "memory.oom.group", "1")
        except BaseException:
            with contextlib.suppress(OSError):
                group.remove()
            raise
        return group

    def claim(self, n: int, dep_id: str) -> Group:
        """Slot ``n``'s cgroup becomes ``dep_id``'s (all of it or nothing)."""
        if not is_id(dep_id):
            raise ValueError(f"not a deployment id: {dep_id[:40]!r}")
        slot = self.slot(n)
        if self.version == 2:
            os.setxattr(slot.dirs[""], ID_XATTR, dep_id.encode(), follow_symlinks=False)
            return slot
        app = self._group(dep_id)
        done: list[str] = []
        try:
            for c, path in slot.dirs.items():
                os.rename(path, app.dirs[c])
                done.append(c)
        except OSError:
            for c in done:
                os.rename(app.dirs[c], slot.dirs[c])
            raise
        return app

    def apps(self) -> dict[str, Group]:
        """Every claimed cgroup of the suite, by deployment id."""
        out: dict[str, Group] = {}
        for name in self._names():
            if self.version == 1 and is_id(name):
                out[name] = self._group(name)
            elif self.version == 2 and SLOT_RE.match(name):
                with contextlib.suppress(OSError):
                    value = os.getxattr(self.roots[""] / name, ID_XATTR, follow_symlinks=False)
                    if is_id(value.decode(errors="replace")):
                        out[value.decode()] = self._group(name)
        return out

    def unclaimed(self) -> list[int]:
        """Slot numbers whose cgroups were never claimed (the pool of an earlier server)."""
        claimed = {g.dirs[""].name for g in self.apps().values()} if self.version == 2 else set()
        found = (SLOT_RE.match(name) for name in self._names() if name not in claimed)
        return sorted(int(m.group(1)) for m in found if m)

    def _names(self) -> list[str]:
        """The groups found in every hierarchy (:meth:`partial` has the others)."""
        return sorted(n for n, count in self._listing().items() if count == len(self.roots))

    def _listing(self) -> Counter[str]:
        """Each group's name, with the number of hierarchies it is found in."""
        found: Counter[str] = Counter()
        for root in self.roots.values():
            with contextlib.suppress(FileNotFoundError):
                found.update(p.name for p in root.iterdir() if p.is_dir())
        return found

    def partial(self) -> list[Group]:
        """Groups found in some hierarchies only (v1): a slot's cgroup made, or claimed (renamed),
        half-way by a server killed meanwhile. No app ever ran in one: a slot is launched only
        once it is whole, and claimed before its launch request is written."""
        whole = len(self.roots)
        return [self._group(n) for n, count in sorted(self._listing().items()) if count < whole]

    def remove_partial(self, keep: Callable[[str], bool] | None = None) -> list[Group]:
        """Remove the :meth:`partial` groups that no process is in (nor ``keep`` keeps, by name:
        a slot another live server is making); return those left."""
        left = []
        for group in self.partial():
            name = next(iter(group.dirs.values())).name
            if (keep is not None and keep(name)) or _busy(group):
                left.append(group)
                continue
            try:
                group.remove()
            except OSError:  # EBUSY past its wait: a process came meanwhile
                left.append(group)
        return left

    def remove_parents(self) -> None:
        """Remove the parent directories if nothing is left in them."""
        for root in self.roots.values():
            with contextlib.suppress(OSError):
                os.rmdir(root)
