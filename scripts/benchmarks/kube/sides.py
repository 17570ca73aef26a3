"""The two sides of the kubernetes launch benchmark, and what they share: the floor (the backend's
pod spec created directly through the API, timed to its first answer at the pod IP), the suite
(launches through the deploy server), and one watch of both sides' pods."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
from harness import DeployServer
from kubernetes import client as kclient
from kubernetes import watch as kwatch

from common.local_http import RequestError, request
from scripts.benchmarks.shared import cpu_ms, machine_busy_ms, post_and_follow, process_cpu
from services.deploy_kubernetes.backends.base import LaunchSpec
from services.deploy_kubernetes.backends.kubernetes.objects import make_pod
from services.deploy_kubernetes.backends.readiness import ready_answer
from services.deploy_kubernetes.models import Template, new_id

POOL = 3
"""Instances of the pooled phase's pool."""
FLOOR_POLL_SECONDS = 0.001
"""The floor looks at a pod whose container runs this often (times the burst's size: a thousand
connect attempts a second in all, which two cores afford beside the node's own work)."""


class PodWatch:
    """One watch of the bench's pods (both namespaces): when each was first seen, seen bound to
    the node (the scheduler's part done), seen with its IP and its container running (the
    kubelet's and containerd's), and gone, on the bench's clock."""

    def __init__(self, api: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._core = kclient.CoreV1Api(api)
        self._loop = loop
        self.seen: dict[str, dict[str, float]] = {}
        self.ips: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._closing = threading.Event()
        threading.Thread(target=self._run, name="pod watch", daemon=True).start()

    def close(self) -> None:
        self._closing.set()

    def _run(self) -> None:
        """List, then watch from the list's version; again when the watch ends. A pod deleted
        between two watches is seen gone by the next list (a bare watch again would start
        from the pods there are, and a wait for that one's deletion would never end)."""
        while not self._closing.is_set():
            with contextlib.suppress(Exception):  # an expired watch: list and watch again
                listed = self._core.list_pod_for_all_namespaces(label_selector="binder.suite")
                when = time.perf_counter()
                self._loop.call_soon_threadsafe(self._listed, listed.items, when)
                stream = kwatch.Watch().stream(
                    self._core.list_pod_for_all_namespaces,
                    label_selector="binder.suite",
                    resource_version=listed.metadata and listed.metadata.resource_version,
                    timeout_seconds=60,
                )
                for event in stream:
                    self._loop.call_soon_threadsafe(self._note, event, time.perf_counter())
                    if self._closing.is_set():
                        return

    def _listed(self, pods: list[Any], when: float) -> None:
        there = {pod.metadata.name for pod in pods}
        for name, marks in self.seen.items():
            if name not in there:
                marks.setdefault("gone", when)
        for pod in pods:
            self._note({"type": "ADDED", "object": pod}, when)
        self._changed.set()

    def _note(self, event: dict[str, Any], when: float) -> None:
        pod = event["object"]
        marks = self.seen.setdefault(pod.metadata.name, {})
        status = pod.status
        running = any(c.state and c.state.running for c in status.container_statuses or [])
        if status.pod_ip and running:
            self.ips[pod.metadata.name] = status.pod_ip
            marks.setdefault("ip", when)
        marks.setdefault("added", when)
        if pod.spec and pod.spec.node_name:
            marks.setdefault("scheduled", when)
        if event["type"] == "DELETED":
            marks.setdefault("gone", when)
        self._changed.set()

    async def until(self, names: list[str], mark: str, seconds: float = 120) -> None:
        """Until every pod of ``names`` has ``mark``."""
        deadline = time.perf_counter() + seconds
        while not all(mark in self.seen.get(n, {}) for n in names):
            self._changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise SystemExit(f"pods not {mark} within {seconds:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


async def _answers(ip: str, port: int, path: str) -> bool:
    with socket.socket() as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(1):
                await asyncio.get_running_loop().sock_connect(sock, (ip, port))
        except (OSError, TimeoutError):
            return False
    try:  # as the suite calls an app ready
        return ready_answer((await request(f"http://{ip}:{port}{path}", seconds=2)).status)
    except RequestError:
        return False


@dataclass
class Launches:
    """One side's launches of a phase: each one's seconds, the phase's wall time, and marks."""

    seconds: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    marks: list[dict[str, float]] = field(default_factory=list)
    """Per launch, its watch marks (and ``done``) in seconds from its start."""
    costs: list[dict[str, float]] = field(default_factory=list)
    """Per phase, what a launch cost the suite (:func:`costs`)."""
    machine: list[dict[str, float]] = field(default_factory=list)
    """Per phase, the machine's CPU by part (:func:`machine_cpu`), per launch."""


class Floor:
    """Pods of the backend's own spec, created directly through the API."""

    def __init__(self, api: Any, namespace: str, pods: PodWatch, suite: set[int]) -> None:
        self._core = kclient.CoreV1Api(api)
        self._namespace = namespace
        self._pods = pods
        self._suite = suite
        """The suite's processes, idle meanwhile but for their background work."""

    async def burst(self, template: Template, n: int, out: Launches) -> None:
        specs = [
            LaunchSpec(id=new_id(), template=template, token=secrets.token_urlsafe(16))
            for _ in range(n)
        ]
        # manifests as dicts, which the client takes
        pods: list[Any] = [make_pod(s, namespace=self._namespace, suite="floor") for s in specs]
        names = [p["metadata"]["name"] for p in pods]
        machine = await asyncio.to_thread(machine_cpu, self._suite)
        start = time.perf_counter()

        async def one(pod: Any, spec: LaunchSpec) -> float:
            await asyncio.to_thread(self._core.create_namespaced_pod, self._namespace, pod)
            name = pod["metadata"]["name"]
            await self._pods.until([name], "ip")
            ip = self._pods.ips[name]
            while True:
                if await _answers(ip, template.port, spec.ready_path):
                    return time.perf_counter()
                await asyncio.sleep(FLOOR_POLL_SECONDS * n)

        done = await asyncio.gather(*(one(p, s) for p, s in zip(pods, specs, strict=True)))
        out.machine.append(_per(await asyncio.to_thread(machine_cpu, self._suite), machine, n))
        record(out, start, dict(zip(names, done, strict=True)), self._pods)
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    self._core.delete_namespaced_pod, n, self._namespace, grace_period_seconds=5
                )
                for n in names
            )
        )
        await self._pods.until(names, "gone")


class Suite:
    """Launches through the deploy server: POST, then its events until it leaves ``deploying``."""

    def __init__(self, server: DeployServer, pods: PodWatch) -> None:
        self.server = server
        self._pods = pods
        self._db: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            server.db.uri, serverSelectionTimeoutMS=10_000
        )
        """The database's counters' reader (one client: no sign-in counted in a burst)."""

    def close(self) -> None:
        self._db.close()

    async def _launch(self, template: str) -> tuple[float, str, str]:
        """(when it left ``deploying``, on the bench's clock; its id; its status then)."""
        try:
            code, dep_id, status = await post_and_follow(self.server.url, template)
        except (RequestError, KeyError, ValueError) as exc:
            return time.perf_counter(), "", f"request failed: {exc}"
        if code != 200:
            return time.perf_counter(), "", f"request failed: POST answered {code}"
        return time.perf_counter(), dep_id, status

    async def burst(self, template: str, n: int, out: Launches) -> None:
        before = await asyncio.to_thread(costs, self.server, self._db)
        machine = await asyncio.to_thread(machine_cpu, suite_pids(self.server))
        start = time.perf_counter()
        launched = await asyncio.gather(*(self._launch(template) for _ in range(n)))
        after = await asyncio.to_thread(machine_cpu, suite_pids(self.server))
        out.machine.append(_per(after, machine, n))
        out.costs.append(_per(await asyncio.to_thread(costs, self.server, self._db), before, n))
        ids = [i for _, i, _ in launched if i]
        out.failures += [s for _, _, s in launched if s != "deployed"]
        deployed = {f"binder-{i}": done for done, i, s in launched if s == "deployed"}
        record(out, start, deployed, self._pods)
        await asyncio.gather(
            *(
                request(
                    f"{self.server.url}/applications/{template}/{i}",
                    method="DELETE",
                    headers=self.server.auth,
                    seconds=60,
                )
                for i in ids
            )
        )
        await self._pods.until([f"binder-{i}" for i in ids], "gone")

    async def pooled(self, runs: int) -> list[float]:
        """A pool of ``POOL`` kept full; each launch takes one (the POST alone)."""
        await self._pool(POOL)
        out = []
        for _ in range(runs):
            deadline = time.monotonic() + 120
            while await self._ready() < POOL:
                if time.monotonic() > deadline:
                    raise SystemExit("the pool did not fill within 120 s")
                await asyncio.sleep(0.02)
            start = time.perf_counter()
            done, dep_id, status = await self._launch("example")
            if status != "deployed":
                raise SystemExit(f"a pooled launch ended {status}")
            out.append(done - start)
            await request(
                f"{self.server.url}/applications/example/{dep_id}",
                method="DELETE",
                headers=self.server.auth,
                seconds=60,
            )
        await self._pool(0)
        return out

    async def _pool(self, size: int) -> None:
        url, auth = f"{self.server.url}/pools/example", self.server.auth
        (await request(url, method="PUT", json={"size": size}, headers=auth, seconds=60))

    async def _ready(self) -> int:
        url, auth = f"{self.server.url}/pools/example", self.server.auth
        return int((await request(url, headers=auth, seconds=60)).json()["ready"])

    async def api_calls(self) -> dict[str, float]:
        calls = {}
        for line in (
            (await request(f"{self.server.url}/metrics", seconds=10)).body.decode().splitlines()
        ):
            if line.startswith("binder_backend_api_calls_total{"):
                verb = line.split('verb="', 1)[1].split('"', 1)[0]
                calls[verb] = float(line.rsplit(" ", 1)[1])
        return calls


def suite_pids(server: DeployServer) -> set[int]:
    """The deploy server's, its database's and its proxy's processes."""
    assert server.proc is not None
    return {server.proc.pid, server.db.proc.pid, server.proxy.proc.pid}


CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-scheduler", "kube-controller", "kwok")
"""The control plane's programs (their names as /proc gives them, cut to 15 characters)."""


def machine_cpu(suite: set[int]) -> dict[str, float]:
    """The machine's CPU so far (ms): in all (``total``, from /proc/stat), the control plane's,
    the suite's processes' (``suite``), this bench's, and the rest (``node_and_apps``: the
    kubelet, containerd, its shims and runc, the apps, the kernel's threads). The node is not
    told apart from the apps: containerd's shims and runc come and go between two looks, and
    their CPU with them."""
    total = machine_busy_ms()
    parts = dict.fromkeys(("control_plane", "suite", "bench"), 0.0)
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, ms = process_cpu(int(entry.name))
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        if pid in suite:
            parts["suite"] += ms
        elif pid == me:
            parts["bench"] += ms
        elif comm.startswith(CONTROL_PLANE):
            parts["control_plane"] += ms
    return {"total": total, **parts, "node_and_apps": total - sum(parts.values())}


def _per(after: dict[str, float], before: dict[str, float], n: int) -> dict[str, float]:
    return {k: (after[k] - before.get(k, 0.0)) / n for k in after}


def costs(server: DeployServer, db: pymongo.MongoClient[dict[str, Any]]) -> dict[str, float]:
    """What the suite has spent so far: the CPU (user + system, all threads, in milliseconds)
    of the deploy server, its database and its proxy, and the database's operations by kind
    (``serverStatus``' counters, read through ``db``, a client kept for the run: a command, a
    getMore of the change streams, ...; each reading is one command of its own)."""
    assert server.proc is not None
    spent = {
        f"{name}_cpu_ms": cpu_ms(proc.pid)
        for name, proc in (
            ("server", server.proc),
            ("db", server.db.proc),
            ("proxy", server.proxy.proc),
        )
    }
    counters = db.admin.command("serverStatus")["opcounters"]
    return spent | {f"db_{kind}s": float(count) for kind, count in counters.items()}


def record(out: Launches, start: float, done: dict[str, float], pods: PodWatch) -> None:
    """A phase's launches that started at ``start``: when each pod answered or was deployed."""
    seconds = [d - start for d in done.values()]
    out.seconds += seconds
    out.walls.append(max(seconds, default=0.0))
    for name, when in done.items():
        marks = pods.seen.get(name, {})
        kept = {k: v - start for k, v in marks.items() if k in ("added", "scheduled", "ip")}
        out.marks.append({**kept, "done": when - start})
