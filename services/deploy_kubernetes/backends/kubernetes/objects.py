"""The kubernetes backend's objects, pure: the manifests it writes and what it reads from the Pods,
DaemonSets and Events the API server returns, as the JSON it sends (so this module does not
import the client, and is tested with plain dicts).

Why JSON and not the client's models: building a ``V1Pod`` costs 0.55 ms (measured here, against
0.014 ms to parse its JSON), and the pod watch reads about ten versions of each launch's pod, one
after another on one thread, while the event loop waits for the GIL."""

from __future__ import annotations

import copy
from collections.abc import Mapping
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


APP_UID = 1000
"""The user and group an app's container runs as, whatever its image says (the first user of
Debian-based images, and repo2docker's ``jovyan``)."""
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": APP_UID,
    "runAsGroup": APP_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""The Pod's: never root, and the runtime's default system call filter."""
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
"""The app container's: no capability, and no way to gain one (setuid programs)."""


def make_pod(spec: LaunchSpec, *, namespace: str, suite: str) -> dict[str, Any]:
    """The Pod manifest of a launch.

    The kubelet's readiness probe is Kubernetes' own (a Service or ``kubectl wait`` goes by it);
    the deploy server does not wait for it: it probes the app at the pod's IP itself, as soon as
    the watch tells that the container runs (the probe's one-second period set the pace of every
    launch: 0.98 s from create to Ready, against 0.35 s to the app's first answer)."""
    template = spec.template
    port = template.port
    command = [spec.substitute(w, port=port, python="python3") for w in template.command]
    env = spec.environment(port=port, python="python3")
    container: dict[str, Any] = {
        "name": "app",
        "image": template.image_source or template.image_name,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": "http", "containerPort": port}],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "readinessProbe": {
            "httpGet": {"path": spec.ready_path, "port": port},
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
            "securityContext": copy.deepcopy(POD_SECURITY),
            "containers": [container],
        },
    }


@dataclass(frozen=True)
class PodView:
    """What the backend needs of a Pod, taken from the watch. ``ready``: the kubelet's readiness
    (told as progress); ``running``: its container runs (the deploy server's own probe starts
    then, at ``ip``); ``exited``: its container ended (its log then tells why)."""

    id: str
    template: str | None
    ready: bool
    ip: str | None
    failure: str | None
    gone: bool = False
    exited: bool = False
    running: bool = False


Json = Mapping[str, Any]
"""An object as the API server sends it (keys in its camelCase)."""


def _container_failure(cs: Json) -> tuple[str | None, bool]:
    """Why a container can never become ready (and whether it ran and ended), or None."""
    state = cs.get("state") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated")
    reason, message = waiting.get("reason"), waiting.get("message")
    if reason in PULL_FAILURES:
        return f"image pull failed for {cs.get('image')}: {message or reason}", False
    if reason in START_FAILURES:
        return f"{reason}: {message or ''}".strip(": "), False
    if terminated is not None:
        failure = f"container exited with code {terminated.get('exitCode')}"
        if terminated.get("reason") not in (None, "", "Error", "Completed"):
            failure += f" ({terminated['reason']})"
        return failure, True
    return None, False


def view(pod: Json, *, gone: bool = False) -> PodView:
    """A PodView of a Pod: readiness, IP, and why it can never become ready, if so."""
    labels = pod.get("metadata", {}).get("labels") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {}).get("status") == "True"
    failure = None
    exited = False
    scheduled = conditions.get("PodScheduled", {})
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        failure = f"unschedulable: {scheduled.get('message')}"
    running = False
    for cs in status.get("containerStatuses") or []:
        found, ended = _container_failure(cs)
        if found is not None:
            failure, exited = found, ended
        running = running or bool((cs.get("state") or {}).get("running") is not None)
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded") and failure is None:
        why = status.get("reason") or status.get("message") or "no reason given"
        failure = f"pod {phase.lower()}: {why}"
    if gone:
        failure = failure or "pod was deleted"
    return PodView(
        labels.get("binder.id", ""),
        labels.get("binder.template"),
        ready,
        status.get("podIP"),
        failure,
        gone,
        exited,
        running,
    )


def with_log(reason: str, log: str, *, lines: int = 5) -> str:
    """``reason`` with the last lines of the container's log, if it wrote any."""
    tail = [line for line in log.splitlines() if line.strip()][-lines:]
    return f"{reason}; last log lines: {' | '.join(tail)}" if tail else reason


UNTOLD_REASONS = frozenset({"Created"})
"""Pod events not told as progress: the kubelet's "Created container" comes within
milliseconds of its "Started container" and tells a user nothing more (a container that fails to
start has a "Failed" event of its own, told). Each message told is a database write and an event
on every server's change stream: progress was 36 of the 107 commands the deploy server sent the
database during a burst of 10 launches, and most of its change stream's getMores."""


def event_message(event: Json) -> tuple[str, str] | None:
    """(pod name, "<reason>: <message>") of a core/v1 Event about a Pod, or None (nor for the
    reasons of :data:`UNTOLD_REASONS`)."""
    about = event.get("involvedObject") or {}
    reason = event.get("reason")
    if about.get("kind") != "Pod" or not about.get("name") or not reason:
        return None
    if reason in UNTOLD_REASONS:
        return None
    return about["name"], f"{reason}: {event.get('message') or ''}".rstrip(": ")


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
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": preload_name(template), "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": copy.deepcopy(POD_SECURITY),
                    "containers": [container],
                },
            },
        },
    }


def preload_state(daemon_set: Json, pods: list[Json]) -> tuple[str, str | None]:
    """("loading" | "completed", why a pull failed or None): completed once the image is on every
    node the DaemonSet runs on (its pod's container got an image ID, whatever it did next)."""
    desired = (daemon_set.get("status") or {}).get("desiredNumberScheduled") or 0
    uid = daemon_set["metadata"]["uid"]
    pulled = 0
    for pod in pods:
        meta = pod.get("metadata") or {}
        owners = meta.get("ownerReferences") or []
        if meta.get("deletionTimestamp") or not any(o.get("uid") == uid for o in owners):
            continue  # a pod of an earlier preload, on its way out
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in PULL_FAILURES:
                node = (pod.get("spec") or {}).get("nodeName")
                why = waiting.get("message") or waiting["reason"]
                return "loading", f"image pull failed for {cs.get('image')} on node {node}: {why}"
            if cs.get("imageID"):
                pulled += 1
    return ("completed" if desired and pulled >= desired else "loading"), None
