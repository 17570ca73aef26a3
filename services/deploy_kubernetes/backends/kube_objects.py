"""The kubernetes backend's objects, pure: the manifests it writes and what it reads from the Pods,
DaemonSets and Events the API server returns (the client's objects, read by attribute, so this
module does not import the client and is tested with plain stand-ins)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.deploy_kubernetes.backends.base import LaunchSpec
from services.deploy_kubernetes.models import Template, cpu_cores

SUITE_LABEL = "binder.suite"
PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
START_FAILURES = (
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def pod_name(dep_id: str) -> str:
    return f"binder-{dep_id}"


def requests(limits: dict[str, str]) -> dict[str, str]:
    """What a Pod asks the scheduler for: all of its memory limit (the kernel enforces it), a tenth
    of its CPU limit (CPU is shared, as Binder deployments mostly idle)."""
    out = dict(limits)
    if "cpu" in limits:
        out["cpu"] = f"{max(1, round(cpu_cores(limits['cpu']) * 100))}m"
    return out


def make_pod(spec: LaunchSpec, *, namespace: str, suite: str) -> dict[str, Any]:
    """The Pod manifest of a launch."""
    template = spec.template
    port = template.port
    command = [spec.substitute(w, port=port, python="python3") for w in template.command]
    env = {**template.env, "PORT": str(port), "BASE_URL": spec.base_url, "BINDER_ID": spec.id}
    container: dict[str, Any] = {
        "name": "app",
        "image": template.image_source or template.image_name,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {
            "httpGet": {"path": spec.base_url, "port": port},
            "periodSeconds": 1,
            "failureThreshold": 3,
        },
    }
    if template.limits:
        container["resources"] = {
            "limits": dict(template.limits),
            "requests": requests(template.limits),
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(spec.id),
            "namespace": namespace,
            "labels": {SUITE_LABEL: suite, "binder.id": spec.id, "binder.template": template.name},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Never",
            "containers": [container],
        },
    }


@dataclass(frozen=True)
class PodView:
    """What the backend needs of a Pod, taken from the watch. ``exited``: its container ended (its
    log then tells why)."""

    id: str
    template: str | None
    ready: bool
    ip: str | None
    failure: str | None
    gone: bool = False
    exited: bool = False


def _container_failure(cs: Any) -> tuple[str | None, bool]:
    """Why a container can never become ready (and whether it ran and ended), or None."""
    waiting = cs.state.waiting if cs.state else None
    terminated = cs.state.terminated if cs.state else None
    if waiting and waiting.reason in PULL_FAILURES:
        return f"image pull failed for {cs.image}: {waiting.message or waiting.reason}", False
    if waiting and waiting.reason in START_FAILURES:
        return f"{waiting.reason}: {waiting.message or ''}".strip(": "), False
    if terminated is not None:
        failure = f"container exited with code {terminated.exit_code}"
        if terminated.reason and terminated.reason not in ("Error", "Completed"):
            failure += f" ({terminated.reason})"
        return failure, True
    return None, False


def view(pod: Any, *, gone: bool = False) -> PodView:
    """A PodView from a V1Pod: readiness, IP, and why it can never become ready, if so."""
    labels = pod.metadata.labels or {}
    status = pod.status
    conditions = {c.type: c for c in (status.conditions or [])} if status else {}
    ready = bool(conditions.get("Ready") and conditions["Ready"].status == "True")
    failure = None
    exited = False
    scheduled = conditions.get("PodScheduled")
    if (
        scheduled is not None
        and scheduled.status == "False"
        and scheduled.reason == "Unschedulable"
    ):
        failure = f"unschedulable: {scheduled.message}"
    for cs in (status.container_statuses or []) if status else []:
        found, ended = _container_failure(cs)
        if found is not None:
            failure, exited = found, ended
    if status and status.phase in ("Failed", "Succeeded") and failure is None:
        failure = (
            f"pod {status.phase.lower()}: {status.reason or status.message or 'no reason given'}"
        )
    if gone:
        failure = failure or "pod was deleted"
    return PodView(
        labels.get("binder.id", ""),
        labels.get("binder.template"),
        ready,
        status.pod_ip if status else None,
        failure,
        gone,
        exited,
    )


def with_log(reason: str, log: str, *, lines: int = 5) -> str:
    """``reason`` with the last lines of the container's log, if it wrote any."""
    tail = [line for line in log.splitlines() if line.strip()][-lines:]
    return f"{reason}; last log lines: {' | '.join(tail)}" if tail else reason


def event_message(event: Any) -> tuple[str, str] | None:
    """(pod name, "<reason>: <message>") of a core/v1 Event about a Pod, or None."""
    obj = event.involved_object
    if obj is None or obj.kind != "Pod" or not obj.name or not event.reason:
        return None
    return obj.name, f"{event.reason}: {event.message or ''}".rstrip(": ")


# --- preloading: a DaemonSet whose pods pull the image on every node ----------------------------


def preload_name(template: Template) -> str:
    return f"binder-preload-{template.name.lower().replace('_', '-').replace('.', '-')}"[:63]


def preload_labels(template: Template, *, suite: str) -> dict[str, str]:
    return {SUITE_LABEL + "-preload": suite, "binder.template": template.name}


def make_preload(template: Template, *, namespace: str, suite: str) -> dict[str, Any]:
    """The DaemonSet that pulls ``template``'s image on every node and keeps it there."""
    labels = preload_labels(template, suite=suite)
    container = {
        "name": "pull",
        "image": template.image_source or template.image_name,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sleep", "2147483647"],
        "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": preload_name(template), "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"automountServiceAccountToken": False, "containers": [container]},
            },
        },
    }


def preload_state(daemon_set: Any, pods: list[Any]) -> tuple[str, str | None]:
    """("loading" | "completed", why a pull failed or None): completed once the image is on every
    node the DaemonSet runs on (its pod's container got an image ID, whatever it did next)."""
    status = daemon_set.status
    desired = (status.desired_number_scheduled or 0) if status else 0
    uid = daemon_set.metadata.uid
    pulled = 0
    for pod in pods:
        owners = pod.metadata.owner_references or []
        if pod.metadata.deletion_timestamp or not any(o.uid == uid for o in owners):
            continue  # a pod of an earlier preload, on its way out
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in PULL_FAILURES:
                node = pod.spec.node_name if pod.spec else None
                why = f"{waiting.message or waiting.reason}"
                return "loading", f"image pull failed for {cs.image} on node {node}: {why}"
            if cs.image_id:
                pulled += 1
    return ("completed" if desired and pulled >= desired else "loading"), None
