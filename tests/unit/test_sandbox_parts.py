"""The sandbox's pure parts and its cgroup v2 paths (this machine has cgroup v1: v2 is checked on
a fake cgroup tree in a temporary folder, files standing for the kernel's)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from common.errors import ConfigError
from services.deploy_kubernetes.backends.local.cgroups import (
    ID_XATTR,
    CgroupError,
    Cgroups,
    Group,
    Limits,
    mounts,
)
from services.deploy_kubernetes.backends.local.groups import exit_reason, oom_killed
from services.deploy_kubernetes.backends.local.network import Network, suite_network
from services.deploy_kubernetes.backends.local.sandboxed import limits_of
from services.deploy_kubernetes.backends.local.uids import Uids, parse_range
from services.deploy_kubernetes.models import Template, new_id

V1 = """\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
32 25 0:28 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
33 25 0:29 / /sys/fs/cgroup/freezer rw,relatime shared:12 - cgroup cgroup rw,freezer
34 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw
"""
V2 = "40 25 0:35 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_hierarchies_are_found_in_mountinfo() -> None:
    version, found = mounts(V1)
    assert version == 1
    assert found == {c: Path(f"/sys/fs/cgroup/{c}") for c in ("memory", "pids", "cpu", "freezer")}
    assert mounts(V2) == (2, {"": Path("/sys/fs/cgroup")})
    with pytest.raises(CgroupError, match="freezer"):
        mounts("\n".join(line for line in V1.splitlines() if "freezer" not in line))
    with pytest.raises(CgroupError, match="memory controller"):
        mounts("")


@pytest.fixture
def v2(tmp_path: Path) -> Cgroups:
    """A fake cgroup2 mount: the files the kernel would have, as plain files."""
    for folder in (tmp_path, tmp_path / "binder-suite"):  # as the kernel makes them
        folder.mkdir(exist_ok=True)
        (folder / "cgroup.subtree_control").write_text("")
    return Cgroups(2, {"": tmp_path}, "binder-suite")


def _fake_v2_files(group: Group) -> None:
    d = group.dirs[""]
    for name in ("cgroup.procs", "memory.max", "memory.swap.max", "pids.max", "cpu.max"):
        (d / name).write_text("")
    (d / "memory.oom.group").write_text("0")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
    (d / "cgroup.freeze").write_text("0")
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")


def test_v2_slots_are_claimed_by_an_attribute_and_found_again(v2: Cgroups, tmp_path: Path) -> None:
    v2.prepare()
    root = tmp_path / "binder-suite"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    os.mkdir(root / "slot-3")
    os.mkdir(root / "slot-4")
    os.mkdir(root / "not-ours")
    dep_id = new_id()
    group = v2.claim(3, dep_id)
    assert group.dirs == {"": root / "slot-3"}  # v2 refuses a rename: the dir stays
    assert os.getxattr(root / "slot-3", ID_XATTR) == dep_id.encode()
    assert v2.apps() == {dep_id: group}
    assert v2.unclaimed() == [4]
    os.setxattr(root / "slot-4", ID_XATTR, b"../../etc")  # only an id is taken for one
    assert set(v2.apps()) == {dep_id}
    with pytest.raises(ValueError, match="not a deployment id"):
        v2.claim(4, "../x")


def test_v2_limits_freeze_and_oom_count(v2: Cgroups, tmp_path: Path) -> None:
    v2.prepare()
    group = v2.slot(1)
    os.mkdir(group.dirs[""])
    _fake_v2_files(group)
    group.set_limits(Limits(memory=256 << 20, pids=1024, cpu_millis=500))  # a kernel before 5.14
    d = group.dirs[""]
    assert (d / "memory.max").read_text() == str(256 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "1024"
    assert (d / "cpu.max").read_text() == "50000 100000"
    (d / "cpu.max.burst").write_text("0")  # 5.14 on: what the app left unused, in a burst
    group.set_limits(Limits(memory=256 << 20, pids=1024, cpu_millis=500))
    assert (d / "cpu.max.burst").read_text() == "50000"
    group.set_limits(Limits(memory=1, pids=2))
    assert (d / "cpu.max").read_text() == "max 100000"
    assert (d / "cpu.max.burst").read_text() == "0"
    assert group.memory_limit() == 1
    group.freeze(True)
    assert (d / "cgroup.freeze").read_text() == "1"
    group.freeze(False)
    assert (d / "cgroup.freeze").read_text() == "0"
    assert group.oom_kills() == 0
    (d / "memory.events").write_text("oom 1\noom_kill 1\noom_group_kill 1\n")
    assert group.oom_kills() == 2
    assert group.oom_file() == d / "memory.events"


def test_v2_oom_watch_wakes_on_the_kernels_file_event(v2: Cgroups) -> None:
    v2.prepare()
    group = v2.slot(2)
    os.mkdir(group.dirs[""])
    _fake_v2_files(group)
    events = group.dirs[""] / "memory.events"

    async def main() -> bool:
        done = anyio.Event()

        async def watch() -> None:
            await oom_killed(group)
            done.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                await anyio.wait_all_tasks_blocked()  # watching
                events.write_text("oom 1\noom_kill 0\n")  # an OOM without a kill
                await anyio.wait_all_tasks_blocked()
                assert not done.is_set()
                events.write_text("oom 2\noom_kill 1\n")
        return done.is_set()

    assert anyio.run(main)


def test_v1_has_one_directory_per_controller_renamed_at_the_claim(tmp_path: Path) -> None:
    mounted = {c: tmp_path / c for c in ("memory", "pids", "cpu", "freezer", "cpuacct")}
    for mount in mounted.values():
        mount.mkdir()
    cgroups = Cgroups(1, mounted, "binder-suite")
    cgroups.prepare()
    for c in ("memory", "pids", "cpu", "freezer"):
        os.mkdir(tmp_path / c / "binder-suite" / "slot-7")
    assert not (tmp_path / "cpuacct" / "binder-suite").exists()
    dep_id = new_id()
    group = cgroups.claim(7, dep_id)
    assert group.paths() == [
        str(tmp_path / c / "binder-suite" / dep_id) for c in ("memory", "pids", "cpu", "freezer")
    ]
    assert cgroups.apps() == {dep_id: group}
    assert cgroups.unclaimed() == []


def test_template_limits() -> None:
    limits, written = limits_of(
        Template(name="t", command=("x",), limits={"memory": "256Mi", "cpu": "500m"}, pids=64)
    )
    assert (limits, written) == (Limits(memory=256 << 20, pids=64, cpu_millis=500), "256Mi")
    limits, written = limits_of(Template(name="t", command=("x",)))
    assert (limits, written) == (Limits(memory=512 << 20, pids=1024, cpu_millis=None), "512Mi")


def test_uids_are_taken_from_the_range_skipping_busy_and_held_ones() -> None:
    assert parse_range("200000-200003") == range(200000, 200004)
    for bad in ("", "0-10", "5-4", "200000", "a-b", "999-2000"):
        with pytest.raises(ConfigError, match="uid_range"):
            parse_range(bad)
    uids = Uids(range(200000, 200004), "suite")
    taken = {uids.take(busy={200001}) for _ in range(3)}
    assert taken == {200000, 200002, 200003}
    with pytest.raises(ConfigError, match="every uid"):
        uids.take(busy={200001})
    uids.free(200002)
    assert uids.take(busy={200001}) == 200002


def test_two_suites_start_apart() -> None:
    first, second = Uids(range(200000, 300000), "a" * 16), Uids(range(200000, 300000), "b" * 16)
    assert abs(first.take(set()) - second.take(set())) > 1000
    assert suite_network("a" * 16) != suite_network("b" * 16)
    assert suite_network("a" * 16).prefixlen == 20


def test_slot_addresses() -> None:
    network = Network("bab12cd", suite_network("a" * 16))
    ns = network.netns(5)
    base = suite_network("a" * 16).network_address
    assert (ns.host_if, ns.app_addr, ns.gateway) == ("bab12cd5", str(base + 22), str(base + 1))
    assert ns.path == Path("/run/netns/bab12cd-5")
    assert network.slots == 1024
    with pytest.raises(ValueError, match="prefix"):
        Network("has-dash", suite_network("a"))


@pytest.mark.parametrize(
    ("status", "oom", "shim", "reason"),
    [
        ("exit 3\n", 0, 3, "process exited with code 3"),
        ("exit 137\n", 0, 137, "process was killed by signal SIGKILL"),
        ("signal 15\n", 0, 143, "process was killed by signal SIGTERM"),
        ("exit 0\n", 1, 0, "out of memory (limit 256Mi)"),
        (None, 0, -signal.SIGKILL, "process was killed by signal SIGKILL"),
        (None, 0, None, "process ended (its exit status is unknown)"),
    ],
)
def test_why_an_app_ended(
    v2: Cgroups, tmp_path: Path, status: str | None, oom: int, shim: int | None, reason: str
) -> None:
    v2.prepare()
    group = v2.slot(9)
    os.mkdir(group.dirs[""])
    _fake_v2_files(group)
    (group.dirs[""] / "memory.events").write_text(f"oom_kill {oom}\n")
    status_file = tmp_path / "app.status"
    if status is not None:
        status_file.write_text(status)
    assert (
        exit_reason(group=group, memory="256Mi", status_file=status_file, shim_code=shim) == reason
    )


def test_v1_groups_made_or_claimed_half_way_are_no_slots_and_go_once_empty(tmp_path: Path) -> None:
    """A server killed between the directories of one cgroup (each hierarchy has its own) leaves
    a half: its name is not free for a new slot, it is neither a slot nor an app, and it is
    removed once no process is in it, unless it is a slot another live server is making."""
    mounted = {c: tmp_path / c for c in ("memory", "pids", "cpu", "freezer")}
    for mount in mounted.values():
        mount.mkdir()
    cgroups = Cgroups(1, mounted, "binder-suite")
    cgroups.prepare()
    dep_id = new_id()

    def make(name: str, controllers: tuple[str, ...], procs: str = "") -> None:
        for c in controllers:
            os.mkdir(tmp_path / c / "binder-suite" / name)
            if procs:  # (an empty cgroup's files do not keep cgroupfs from removing it)
                (tmp_path / c / "binder-suite" / name / "cgroup.procs").write_text(procs)

    make("slot-3", ("memory", "pids"))  # killed while making slot 3
    make(dep_id, ("memory",))  # killed while claiming slot 5 for dep_id
    make("slot-5", ("pids", "cpu", "freezer"))
    make("slot-6", ("memory",))  # another live server making slot 6
    make("slot-8", ("memory", "pids", "cpu"), procs="4242\n")  # a process still in it
    make("slot-9", ("memory", "pids", "cpu", "freezer"))  # whole: a slot
    assert cgroups.slot(3).exists()
    assert cgroups.unclaimed() == [9]
    assert cgroups.apps() == {}
    assert {name for g in cgroups.partial() for name in {p.name for p in g.dirs.values()}} == {
        "slot-3",
        "slot-5",
        "slot-6",
        "slot-8",
        dep_id,
    }
    left = cgroups.remove_partial(keep=lambda name: name == "slot-6")
    assert sorted(next(iter(g.dirs.values())).name for g in left) == ["slot-6", "slot-8"]
    for name in ("slot-3", "slot-5", dep_id):
        assert not any((tmp_path / c / "binder-suite" / name).exists() for c in mounted)
    assert (tmp_path / "freezer" / "binder-suite" / "slot-9").is_dir()
