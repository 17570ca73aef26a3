"""``scripts/bench launch --sandbox compare``: what the local sandbox costs a launch, in one run.

Two suites run side by side, one with ``[deploy.local] sandbox = true`` and one without; each
round runs the example app alone, then one launch on each suite (their order alternating), so
that both see the same machine. Then the sandbox's parts, in this process (root): off the launch
path, a network namespace made and removed, and a slot (cgroup made, namespace, helper parked and
joined, its waiter started) without bwrap and with it (the difference: bwrap's namespaces and
view of the system, made ahead); on it, from the launch request to the app's first byte of
output, for a helper exec'ing the app directly as unsandboxed apps start (``direct``), a parked
helper whose waiter execs it without bwrap (``parked``: the cgroup and namespace joined ahead,
the uid switch, the shim, the waiter) and in bwrap's sandbox (``parked + bwrap``), the app being
``/bin/echo``.
"""

from __future__ import annotations

import asyncio
import os
import select
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from common.settings import LocalSettings
from scripts.benchmarks.launch import app_alone, launch
from scripts.benchmarks.shared import Suite, cpu_ms, running_suite
from services.deploy_kubernetes.backends.local.cgroups import Cgroups
from services.deploy_kubernetes.backends.local.helper import (
    Sizes,
    bwrap,
    bwrap_args,
    direct_words,
    launch_request,
    reachable_by_others,
)
from services.deploy_kubernetes.backends.local.network import Network, suite_network
from services.deploy_kubernetes.backends.local.slots import Slots
from services.deploy_kubernetes.backends.local.uids import Uids, parse_range

Figures = dict[str, float | int | str]


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else 0.0


async def _interleaved(on: Suite, off: Suite, runs: int) -> Figures:
    alone: list[float] = []
    took: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, float] = {"on": 0.0, "off": 0.0}
    failures = 0
    suites = {"on": on, "off": off}
    clients = {k: httpx.AsyncClient(base_url=s.url, timeout=120) for k, s in suites.items()}
    try:
        async with httpx.AsyncClient(timeout=5) as direct:
            for round_ in range(runs + 2):
                seen = await app_alone(direct)
                for name in ("on", "off") if round_ % 2 else ("off", "on"):
                    suite = suites[name]
                    before = cpu_ms(suite.pids["deploy-kubernetes"])
                    outcome = await launch(clients[name], "example")
                    after = cpu_ms(suite.pids["deploy-kubernetes"])
                    await clients[name].delete(
                        f"/applications/example/{outcome.id}", headers=suite.auth
                    )
                    if round_ < 2:  # warm-up
                        continue
                    if outcome.status != "deployed":
                        failures += 1
                        continue
                    took[name].append(outcome.seconds)
                    cpu[name] += after - before
                if round_ >= 2:
                    alone.append(seen)
    finally:
        for client in clients.values():
            await client.aclose()
    paired = [a - b for a, b in zip(took["on"], took["off"], strict=False)]
    return {
        "app_alone_p50_ms": _ms(alone),
        "launch_p50_ms_sandbox_on": _ms(took["on"]),
        "launch_p50_ms_sandbox_off": _ms(took["off"]),
        "overhead_p50_ms_sandbox_on": _ms(took["on"]) - _ms(alone),
        "overhead_p50_ms_sandbox_off": _ms(took["off"]) - _ms(alone),
        "sandbox_cost_paired_p50_ms": _ms(paired),
        "server_cpu_ms_per_launch_sandbox_on": cpu["on"] / max(1, len(took["on"])),
        "server_cpu_ms_per_launch_sandbox_off": cpu["off"] / max(1, len(took["off"])),
        "failures": failures,
    }


def _requester(fd: int, request: bytes) -> Callable[[], None]:
    def write() -> None:
        os.write(fd, request)
        os.close(fd)

    return write


def _first_byte(start: Callable[[], None], fifo: Path) -> float:
    """Seconds from ``start()`` to the first byte written into ``fifo``."""
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        began = time.perf_counter()
        start()
        while True:
            select.select([reader], [], [], 5)
            try:
                if os.read(reader, 4096):
                    return time.perf_counter() - began
            except BlockingIOError:
                continue
    finally:
        os.close(reader)


def _direct(fifo: Path) -> float:
    """The direct form (today's unsandboxed apps): spawned, switched, exec'd in place."""
    argv = [*direct_words(None, None), "/bin/echo", "hi"]
    spawned: list[int] = []

    def start() -> None:
        actions = [(os.POSIX_SPAWN_OPEN, 1, str(fifo), os.O_WRONLY, 0)]
        spawned.append(os.posix_spawn(argv[0], argv, {}, file_actions=actions))

    took = _first_byte(start, fifo)
    os.waitpid(spawned[0], 0)
    return took


def _parts(rounds: int) -> Figures:
    """The sandbox's parts, measured with its own modules (needs root)."""
    work = Path(tempfile.mkdtemp(prefix="binder-bench-parts-"))
    label = os.urandom(8).hex()
    network = Network(f"q{label[:6]}", suite_network(label))
    cgroups = Cgroups.of_host(f"binder-bench-{label}")
    uids = Uids(parse_range(LocalSettings().uid_range), label)
    slots = Slots(cgroups=cgroups, network=network, uids=uids, size=0)
    cgroups.prepare()
    network.prepare()
    netns: list[float] = []
    slot_times: dict[str, list[float]] = {"parked": [], "parked + bwrap": []}
    firsts: dict[str, list[float]] = {"direct": [], "parked": [], "parked + bwrap": []}
    bw = [bwrap(), *bwrap_args(hidden=[work], sizes=Sizes(), reachable=reachable_by_others)]
    try:
        for n in range(rounds):
            began = time.perf_counter()
            ns = network.make(1000 - n % 20)
            netns.append(time.perf_counter() - began)
            network.remove(ns)
        for n in range(rounds):
            for name in ("direct", "parked", "parked + bwrap"):
                fifo = work / f"{name}-{n}".replace(" ", "")
                os.mkfifo(fifo, 0o600)
                if name == "direct":
                    firsts[name].append(_direct(fifo))
                    continue
                slots.sandbox = bw if name != "parked" else []
                began = time.perf_counter()
                slot = slots.make()
                slot_times[name].append(time.perf_counter() - began)
                request = launch_request(
                    log=fifo,
                    log_max=1 << 20,
                    status=work / f"status-{n}",
                    argv=["/bin/echo", "hi"],
                    env={"PATH": "/usr/bin:/bin"},
                )

                firsts[name].append(_first_byte(_requester(slot.request, request), fifo))
                slot.helper.wait()
                slot.group.remove()
                network.remove(slot.netns)
                uids.free(slot.uid)
                slots.release_number(slot.n)
    finally:
        network.drop_host_side()
        cgroups.remove_parents()
    return {
        "part_netns_make_p50_ms (off the path)": _ms(netns),
        "part_slot_make_p50_ms (off the path: cgroup, netns, park+join, bwrap)": _ms(
            slot_times["parked + bwrap"]
        ),
        "part_cgroup_and_join_p50_ms (off the path)": _ms(slot_times["parked"]) - _ms(netns),
        "part_bwrap_setup_p50_ms (off the path)": _ms(slot_times["parked + bwrap"])
        - _ms(slot_times["parked"]),
        "first_byte_p50_ms_direct (today's)": _ms(firsts["direct"]),
        "first_byte_p50_ms_parked (uid, shim, waiter; cgroup and netns joined ahead)": _ms(
            firsts["parked"]
        ),
        "first_byte_p50_ms_parked_bwrap (namespaces and view made ahead)": _ms(
            firsts["parked + bwrap"]
        ),
        "part_bwrap_on_the_path_p50_ms": _ms(firsts["parked + bwrap"]) - _ms(firsts["parked"]),
        "part_shim_and_switch_p50_ms": _ms(firsts["parked"]) - _ms(firsts["direct"]),
    }


def compare(runs: int) -> tuple[Figures, dict[str, str]]:
    print(
        f"the sandbox's cost: the app alone and one launch on a suite with and one without the "
        f"sandbox, x{runs}, interleaved; then its parts x{runs}"
    )
    with running_suite(sandbox=True) as on, running_suite(sandbox=False) as off:
        figures = asyncio.run(_interleaved(on, off, runs))
    figures |= _parts(runs)
    targets = {
        "sandbox_cost_paired_p50_ms": "(target <= 5)",
        "overhead_p50_ms_sandbox_on": "(target <= 20)",
        "failures": "(target 0)",
    }
    return figures, targets
