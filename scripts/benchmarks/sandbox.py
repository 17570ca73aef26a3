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
``/bin/echo``; and the example app's own start, from the launch request to its first 200,
directly on the host and in a slot (with the template's limits, and without its CPU quota).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import select
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import free_port

from common.settings import LocalSettings
from scripts.benchmarks.launch import app_alone, launch
from scripts.benchmarks.shared import Suite, cpu_ms, running_suite
from services.deploy_kubernetes.backends.local.cgroups import Cgroups, Limits
from services.deploy_kubernetes.backends.local.helper import (
    APP_HOME,
    Sizes,
    bwrap,
    bwrap_args,
    closed_to_others,
    direct_words,
    installation,
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


EXAMPLE_LIMITS = Limits(memory=256 << 20, pids=1024, cpu_millis=1000)
"""The example template's limits (``configs/templates/example.toml``)."""


def _answers(host: str, port: int, began: float) -> float:
    """Seconds from ``began`` to the example app's first 200 at ``host:port`` (connect attempts
    every half millisecond until it listens, then GETs)."""
    deadline = began + 30
    while time.perf_counter() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            time.sleep(0.0005)
            continue
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return time.perf_counter() - began
        except OSError:
            time.sleep(0.0005)
        finally:
            conn.close()
    raise SystemExit(f"the example app never answered at {host}:{port}")


def _example(port: int) -> list[str]:
    return [sys.executable, "-m", "services.example_app", "--port", str(port), "--base-url", "/"]


def _app_direct() -> float:
    """The example app spawned on the host (as the suite's own checks start it)."""
    port = free_port()
    began = time.perf_counter()
    pid = os.posix_spawn(
        sys.executable,
        _example(port),
        {"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        file_actions=[(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)],
    )
    try:
        return _answers("127.0.0.1", port, began)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def _app_in_slot(slots: Slots, work: Path, n: int, limits: Limits) -> float:
    """The example app launched in a slot made ahead, with ``limits``."""
    slot = slots.make()
    slot.group.set_limits(limits)
    request = launch_request(
        log=work / f"example-{n}.log",
        log_max=1 << 20,
        status=work / f"example-{n}.status",
        argv=_example(8888),
        env={"PATH": "/usr/bin:/bin", "HOME": APP_HOME},
    )
    began = time.perf_counter()
    _requester(slot.request, request)()
    try:
        return _answers(slot.netns.app_addr, 8888, began)
    finally:
        slots.drop(slot)


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
    apps: dict[str, list[float]] = {"direct": [], "slot": [], "slot, no quota": []}
    bw = [
        bwrap(),
        *bwrap_args(
            hidden=[work], sizes=Sizes(), reachable=reachable_by_others, shown=installation()
        ),
    ]
    slots.reach = closed_to_others(installation())
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
        slots.sandbox = bw
        for n in range(rounds):
            apps["direct"].append(_app_direct())
            apps["slot"].append(_app_in_slot(slots, work, n, EXAMPLE_LIMITS))
            no_quota = Limits(memory=EXAMPLE_LIMITS.memory, pids=EXAMPLE_LIMITS.pids)
            apps["slot, no quota"].append(_app_in_slot(slots, work, rounds + n, no_quota))
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
        "example_app_p50_ms_direct": _ms(apps["direct"]),
        "example_app_p50_ms_in_slot": _ms(apps["slot"]),
        "example_app_p50_ms_in_slot_no_cpu_quota": _ms(apps["slot, no quota"]),
        "part_app_in_sandbox_paired_p50_ms": _ms(
            [s - d for s, d in zip(apps["slot"], apps["direct"], strict=True)]
        ),
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
