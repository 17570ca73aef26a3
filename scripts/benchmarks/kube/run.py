"""The launch benchmark on the kubernetes backend, against the test cluster's real node
(scripts/kube-testenv), beside its floor, in one run.

The floor: the backend's own pod spec (:func:`make_pod`) created directly through the API, timed
from the create to the app's first HTTP answer at its pod IP, found as fast as sensible (the IP
from a watch, then a connect attempt every millisecond, times the burst's size, then a GET). The
suite: POST to ``deployed`` (followed on the launch's events stream) for the shipped ``example``
template.

Both run interleaved on the same node, one at a time and in bursts (all created, or POSTed, at
once; each burst once the last one's pods are gone), so that a busy machine weighs on both alike.
Also measured: pooled launches (the POST alone), the API calls per launch, what a launch costs
the suite (the CPU of the deploy server, the database and the proxy, which share the node's cores
here, and the database's operations), and where a launch spends its time (from the bench's own watch of the pods: the
pod first seen, then seen running with its IP; from the client: answered, or deployed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import statistics
import subprocess
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from harness import DeployServer, wait_for
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException

from common.local_http import request
from scripts.benchmarks.kube.sides import Floor, Launches, PodWatch, Suite, suite_pids
from scripts.benchmarks.shared import ROOT, pct, report, suite
from services.deploy_kubernetes.backends.kubernetes.objects import requests
from services.deploy_kubernetes.engine.deployer import read_template_files
from services.deploy_kubernetes.models import Template, cpu_cores

BURSTS = (10, 50)
WRITES = ("create", "delete", "patch", "replace")
SHARE_OF_NODE = 0.75
"""A burst's pods ask the scheduler for at most this share of the node's CPU: the example's
request (a tenth of its 1-CPU limit) times 50 is more than a 2-core node has."""


def _cluster() -> tuple[str, Any]:
    """(kubeconfig, ApiClient) of the test cluster, started if it is not running."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "kube-testenv"), "start"],
        check=True,
        text=True,
        stdout=subprocess.PIPE,
    ).stdout
    kubeconfig = out.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
    cfg = kclient.Configuration()
    kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 64  # a burst's creates each on a kept connection
    return kubeconfig, kclient.ApiClient(cfg)


def _namespace(core: Any, name: str) -> str:
    core.create_namespace(kclient.V1Namespace(metadata=kclient.V1ObjectMeta(name=name)))
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=60,
        ignore=(ApiException,),
        what="the namespace's default service account",
    )
    return name


def _burst_template(example: Template, node_cpu: float, n: int) -> Template:
    """``example`` as it fits ``n`` times on the node (its CPU limit lowered if need be)."""
    wanted = cpu_cores(requests(example.limits).get("cpu", "0")) * n
    if wanted <= node_cpu * SHARE_OF_NODE:
        return example
    limit = node_cpu * SHARE_OF_NODE / n * 10  # the request is a tenth of the limit
    return replace(
        example, name="example-burst", limits={**example.limits, "cpu": f"{int(limit * 1000)}m"}
    )


def _node_cpu(api: Any) -> float:
    """The CPU the real node offers pods (the test cluster's simulated nodes left out)."""
    cores = 0.0
    for node in kclient.CoreV1Api(api).list_node(label_selector="type=real").items:
        allocatable = node.status.allocatable if node.status else None
        cores += cpu_cores(allocatable["cpu"]) if allocatable else 0.0
    return cores


async def _alternate(steps: list[Callable[[], Awaitable[None]]], rounds: int) -> None:
    """``steps`` one after the other, ``rounds`` times, in turn first."""
    for r in range(rounds):
        order = steps[r % len(steps) :] + steps[: r % len(steps)]
        for step in order:
            await step()


@dataclass
class Results:
    floor: dict[str, Launches]
    suite: dict[str, Launches]
    pooled: list[float]
    calls_per_launch: dict[str, float]


async def _measure(
    server: DeployServer, api: Any, floor_ns: str, runs: int, bursts: int, name: str = "example"
) -> Results:
    """One at a time, then (the example) bursts and pooled launches. ``name``: the shipped
    template launched one at a time (``jupyter``: that phase alone)."""
    (example,) = [t for t in read_template_files(ROOT / "configs" / "templates") if t.name == name]
    pods = PodWatch(api, asyncio.get_running_loop())
    floor, launches = Floor(api, floor_ns, pods, suite_pids(server)), Suite(server, pods)
    node_cpu = await asyncio.to_thread(_node_cpu, api)
    fl: dict[str, Launches] = {"one": Launches()}
    su: dict[str, Launches] = {"one": Launches()}
    try:
        await floor.burst(example, 1, Launches())  # warm-up: the image on the node, connections
        await launches.burst(name, 1, Launches())
        before = await launches.api_calls()
        await _alternate(
            [
                functools.partial(floor.burst, example, 1, fl["one"]),
                functools.partial(launches.burst, name, 1, su["one"]),
            ],
            runs,
        )
        after = await launches.api_calls()
        if name != "example":
            return Results(fl, su, [], _per_launch(before, after, runs))
        for n in BURSTS:
            template = _burst_template(example, node_cpu, n)
            if template is not example:
                await request(
                    f"{server.url}/templates/{template.name}",
                    method="PUT",
                    json=template.to_api(),
                    headers=server.auth,
                    seconds=30,
                )
            fl[f"burst{n}"], su[f"burst{n}"] = Launches(), Launches()
            await _alternate(
                [
                    functools.partial(floor.burst, template, n, fl[f"burst{n}"]),
                    functools.partial(launches.burst, template.name, n, su[f"burst{n}"]),
                ],
                bursts,
            )
        pooled = await launches.pooled(min(runs, 20))
    finally:
        pods.close()
        launches.close()
    return Results(fl, su, pooled, _per_launch(before, after, runs))


def _per_launch(before: dict[str, float], after: dict[str, float], runs: int) -> dict[str, float]:
    return {verb: (after.get(verb, 0) - before.get(verb, 0)) / runs for verb in after}


def _ms(values: list[float], q: float = 0.5) -> float:
    return (
        (statistics.median(values) if q == 0.5 else pct(values, q)) * 1000
        if values
        else float("nan")
    )


def _mark(launches: Launches, a: str, b: str, q: float = 0.5) -> float:
    """Milliseconds from mark ``a`` (or the start) to mark ``b`` of ``launches``, their median
    (or ``q`` quantile)."""
    spans = [m[b] - m.get(a, 0.0) for m in launches.marks if b in m and (a == "start" or a in m)]
    return _ms(spans, q)


def _figures(r: Results) -> tuple[dict[str, float | int | str], dict[str, str]]:
    fl, su = r.floor["one"], r.suite["one"]
    f: dict[str, float | int | str] = {
        "floor_p50_ms": _ms(fl.seconds),
        "floor_p95_ms": _ms(fl.seconds, 0.95),
        "p50_ms": _ms(su.seconds),
        "p95_ms": _ms(su.seconds, 0.95),
        "p50_over_floor_ms": _ms(su.seconds) - _ms(fl.seconds),
    }
    bursts = [n for n in BURSTS if f"burst{n}" in r.suite]
    for n in bursts:
        floor_wall, wall = (
            statistics.median(r.floor[f"burst{n}"].walls),
            statistics.median(r.suite[f"burst{n}"].walls),
        )
        f[f"burst{n}_floor_all_answered_s"] = floor_wall
        f[f"burst{n}_all_deployed_s"] = wall
        f[f"burst{n}_over_floor"] = wall / floor_wall
    if r.pooled:
        f |= {"pooled_p50_ms": _ms(r.pooled), "pooled_p95_ms": _ms(r.pooled, 0.95)}
    f |= {
        "failures": sum(len(s.failures) for s in r.suite.values()),
        "api_calls_per_launch": sum(r.calls_per_launch.values()),
        "api_writes_per_launch": sum(v for k, v in r.calls_per_launch.items() if k in WRITES),
        "server_cpu_ms_per_launch": statistics.median(c["server_cpu_ms"] for c in su.costs),
        # where the time goes (medians, from the bench's own pod watch)
        "floor_create_to_ip_ms": _mark(fl, "start", "ip"),
        "floor_ip_to_answer_ms": _mark(fl, "ip", "done"),
        "post_to_ip_ms": _mark(su, "start", "ip"),
        "ip_to_deployed_ms": _mark(su, "ip", "done"),
        "floor_create_to_seen_ms": _mark(fl, "start", "added"),
        "post_to_seen_ms": _mark(su, "start", "added"),
    }
    for n in bursts:
        b, fb = r.suite[f"burst{n}"], r.floor[f"burst{n}"]
        # what a launch costs the suite, on the cores the node's kubelet, containerd and apps use
        for cost in b.costs[0]:
            f[f"burst{n}_{cost}_per_launch"] = statistics.median(c[cost] for c in b.costs)
        # the machine's CPU per launch by part, each side's bursts (ms): what the suite adds
        for part in b.machine[0]:
            f[f"burst{n}_floor_machine_{part}_cpu_ms"] = statistics.median(
                m[part] for m in fb.machine
            )
            f[f"burst{n}_machine_{part}_cpu_ms"] = statistics.median(m[part] for m in b.machine)
        f[f"burst{n}_floor_create_to_seen_p95_ms"] = _mark(fb, "start", "added", 0.95)
        f[f"burst{n}_post_to_seen_p95_ms"] = _mark(b, "start", "added", 0.95)
        # the scheduler's part, then the kubelet's and containerd's (sandbox, network, container)
        f[f"burst{n}_floor_seen_to_scheduled_p50_ms"] = _mark(fb, "added", "scheduled")
        f[f"burst{n}_seen_to_scheduled_p50_ms"] = _mark(b, "added", "scheduled")
        f[f"burst{n}_floor_scheduled_to_ip_p50_ms"] = _mark(fb, "scheduled", "ip")
        f[f"burst{n}_scheduled_to_ip_p50_ms"] = _mark(b, "scheduled", "ip")
        f[f"burst{n}_floor_create_to_ip_p50_ms"] = _mark(fb, "start", "ip")
        f[f"burst{n}_post_to_ip_p50_ms"] = _mark(b, "start", "ip")
        f[f"burst{n}_floor_ip_to_answer_p50_ms"] = _mark(fb, "ip", "done")
        f[f"burst{n}_ip_to_deployed_p50_ms"] = _mark(b, "ip", "done")
    targets = {
        "p50_over_floor_ms": "(target <= 50)",
        "burst10_over_floor": "(target <= 1.1)",
        "burst50_over_floor": "(target <= 1.1)",
        "pooled_p50_ms": "(target < 10)",
        "failures": "(target 0)",
        "api_writes_per_launch": "(target 2: create + delete)",
    }
    return f, {k: v for k, v in targets.items() if k in f}


def bench_launch_kubernetes(runs: int, bursts: int = 3, template: str = "example") -> None:
    """The example template (one at a time, bursts, pooled), or ``template`` one at a time."""
    kubeconfig, api = _cluster()
    core = kclient.CoreV1Api(api)
    tag = os.getpid()
    floor_ns = _namespace(core, f"binder-bench-floor-{tag}")
    suite_ns = _namespace(core, f"binder-bench-{tag}")
    extra = f'[deploy.kubernetes]\nkubeconfig = "{kubeconfig}"\nnamespace = "{suite_ns}"\n'
    phases = (
        f"bursts of {' and '.join(map(str, BURSTS))} x{bursts}, pooled"
        if template == "example"
        else f"of the {template} template"
    )
    print(
        f"launch on the kubernetes backend (the test cluster's real node), beside the floor (the "
        f"same pod spec created through the API, to its first ready answer at the pod IP), "
        f"interleaved: x{runs} one at a time, {phases}"
    )
    try:
        with suite(
            cull_interval_seconds=3600, max_deployments=400, backend="kubernetes", extra=extra
        ) as server:
            loop = asyncio.new_event_loop()
            loop.set_default_executor(ThreadPoolExecutor(64))
            try:
                results = loop.run_until_complete(
                    _measure(server, api, floor_ns, runs, bursts, template)
                )
            finally:
                loop.close()
    finally:
        for ns in (floor_ns, suite_ns):
            with contextlib.suppress(ApiException):
                core.delete_namespace(ns)
    figures, targets = _figures(results)
    report(
        "launch-kubernetes" if template == "example" else f"launch-kubernetes-{template}",
        figures,
        targets,
    )
