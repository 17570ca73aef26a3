"""The launch benchmark on the kubernetes backend, against the test cluster's real node
(scripts/kube-testenv): POST to deployed for the shipped `example` template with its image cached,
a burst of launches at once, API calls per launch, and, as the limit to compare with, the same Pod's
own create-to-Ready time measured with kubectl in the same run."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from bench import _api_calls, _launch_once, pct, report, suite
from harness import wait_for

ROOT = Path(__file__).resolve().parent.parent
BURST = 10
WRITES = ("create", "delete", "patch", "replace")


def _cluster() -> tuple[str, str, Any]:
    """(kubeconfig, a new namespace, a CoreV1Api) of the running test cluster."""
    from kubernetes import client as kclient
    from kubernetes import config as kconfig
    from kubernetes.client.exceptions import ApiException

    out = subprocess.run(
        [str(ROOT / "scripts" / "kube-testenv"), "start"],
        check=True,
        text=True,
        stdout=subprocess.PIPE,
    ).stdout
    kubeconfig = out.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
    namespace = f"binder-bench-{os.getpid()}"
    api = kclient.CoreV1Api(kconfig.new_client_from_config(config_file=kubeconfig))
    api.create_namespace({"metadata": {"name": namespace}})
    wait_for(
        lambda: api.read_namespaced_service_account("default", namespace),
        timeout=60,
        ignore=(ApiException,),
        what="the namespace's default service account",
    )
    return kubeconfig, namespace, api


def _burst(c: httpx.Client, server: Any, n: int) -> tuple[float, list[float]]:
    """``n`` launches at once: (time until all are deployed, each one's POST-to-deployed)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        each = list(pool.map(lambda _: _launch_once(c, server, "example"), range(n)))
    return time.perf_counter() - start, each


def _kubectl_ready(kubeconfig: str, namespace: str, runs: int) -> list[float]:
    """Create the backend's own Pod manifest with kubectl and wait for Ready, ``runs`` times."""
    from services.deploy_kubernetes.backends.base import LaunchSpec
    from services.deploy_kubernetes.backends.kube_objects import make_pod
    from services.deploy_kubernetes.models import new_id
    from services.deploy_kubernetes.service import read_template_files

    (example,) = [
        t for t in read_template_files(ROOT / "configs" / "templates") if t.name == "example"
    ]
    kubectl = ["kubectl", f"--kubeconfig={kubeconfig}", f"--namespace={namespace}"]
    times = []
    for _ in range(runs):
        pod = make_pod(LaunchSpec(new_id(), example), namespace=namespace, suite="bench-kubectl")
        name = pod["metadata"]["name"]
        start = time.perf_counter()
        subprocess.run(
            [*kubectl, "create", "-f", "-"],
            input=json.dumps(pod),
            text=True,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Ready", "--timeout=60s", f"pod/{name}"],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - start)
        subprocess.run(
            [*kubectl, "delete", "pod", name, "--wait=false"], check=True, capture_output=True
        )
    return times


def bench_launch_kubernetes(runs: int) -> None:
    if shutil.which("kubectl") is None:
        raise SystemExit("kubectl is needed for the pod's own create-to-Ready time")
    kubeconfig, namespace, api = _cluster()
    extra = f'[deploy.kubernetes]\nkubeconfig = "{kubeconfig}"\nnamespace = "{namespace}"\n'
    print(f"launch latency, POST -> deployed, {runs} launches of `example` on a real node")
    try:
        with (
            suite(cull_interval_seconds=3600, backend="kubernetes", extra=extra) as server,
            httpx.Client(base_url=server.url, timeout=120) as c,
        ):
            _launch_once(c, server, "example")  # warm-up: the node pulls the image once
            before = _api_calls(c)
            latencies = [_launch_once(c, server, "example") for _ in range(runs)]
            after = _api_calls(c)
            burst_total, burst = _burst(c, server, BURST)
        kubectl = _kubectl_ready(kubeconfig, namespace, min(runs, 10))
    finally:
        api.delete_namespace(namespace)
    delta = {verb: (after.get(verb, 0) - before.get(verb, 0)) / runs for verb in after}
    figures: dict[str, float | int | str] = {
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": pct(latencies, 0.95) * 1000,
        f"burst{BURST}_all_deployed_ms": burst_total * 1000,
        f"burst{BURST}_p50_ms": statistics.median(burst) * 1000,
        f"burst{BURST}_p95_ms": pct(burst, 0.95) * 1000,
        "api_calls_per_launch": sum(delta.values()),
        "api_writes_per_launch": sum(v for k, v in delta.items() if k in WRITES),
        "list_calls_per_launch": delta.get("list", 0) + delta.get("watch", 0),
        "kubectl_create_to_ready_p50_ms": statistics.median(kubectl) * 1000,
        "kubectl_create_to_ready_p95_ms": pct(kubectl, 0.95) * 1000,
    }
    targets = {
        "p50_ms": "(target < 1500)",
        "api_writes_per_launch": "(target <= 6; create + delete)",
        "kubectl_create_to_ready_p50_ms": "(the pod's own limit)",
    }
    report("launch-kubernetes", figures, targets)
