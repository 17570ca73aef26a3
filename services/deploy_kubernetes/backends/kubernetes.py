"""The ``kubernetes`` backend: one Pod per deployment, its state taken from a watch.

The official client is synchronous: calls run in worker threads, and one thread keeps a watch on
the suite's pods (re-listing after the API server restarts or the watch expires). Launch costs one
API write (the Pod), stop one (its deletion); nothing polls. The only module that imports
``kubernetes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from loguru import logger

from services.deploy_kubernetes.backends.base import LaunchSpec, Notify, Observed, State
from services.deploy_kubernetes.errors import BadBackendError, LaunchError
from services.deploy_kubernetes.models import Template

T = TypeVar("T")
SUITE_LABEL = "binder.suite"
WATCH_SECONDS = 240


def pod_name(dep_id: str) -> str:
    return f"binder-{dep_id}"


def make_pod(spec: LaunchSpec, *, namespace: str, suite: str) -> dict[str, Any]:
    """The Pod manifest of a launch (pure, so it is tested as a dict)."""
    template = spec.template
    port = template.port
    command = [spec.substitute(w, port=port, python="python3") for w in template.command]
    env = {**template.env, "PORT": str(port), "BASE_URL": spec.base_url, "BINDER_ID": spec.id}
    container: dict[str, Any] = {
        "name": "app",
        "image": template.image_source or template.image_name,
        "command": command,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {
            "httpGet": {"path": spec.base_url, "port": port},
            "periodSeconds": 2,
            "failureThreshold": 60,
        },
    }
    if template.limits:
        container["resources"] = {
            "limits": dict(template.limits),
            "requests": dict(template.limits),
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
    """What the backend needs of a Pod, taken from the watch."""

    id: str
    template: str | None
    ready: bool
    ip: str | None
    failure: str | None
    gone: bool = False


def view(pod: Any, *, gone: bool = False) -> PodView:
    """A PodView from a V1Pod: readiness, IP, and why it can never become ready, if so."""
    labels = pod.metadata.labels or {}
    status = pod.status
    conditions = {c.type: c for c in (status.conditions or [])} if status else {}
    ready = bool(conditions.get("Ready") and conditions["Ready"].status == "True")
    failure = None
    scheduled = conditions.get("PodScheduled")
    if (
        scheduled is not None
        and scheduled.status == "False"
        and scheduled.reason == "Unschedulable"
    ):
        failure = f"unschedulable: {scheduled.message}"
    for cs in (status.container_statuses or []) if status else []:
        waiting = cs.state.waiting if cs.state else None
        terminated = cs.state.terminated if cs.state else None
        if waiting and waiting.reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
            failure = f"image pull failed: {waiting.message or waiting.reason}"
        elif waiting and waiting.reason in (
            "CrashLoopBackOff",
            "CreateContainerConfigError",
            "CreateContainerError",
            "RunContainerError",
        ):
            failure = f"{waiting.reason}: {waiting.message or ''}".strip(": ")
        elif terminated is not None:
            failure = f"container exited with code {terminated.exit_code}"
            if terminated.reason and terminated.reason not in ("Error", "Completed"):
                failure += f" ({terminated.reason})"
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
    )


class KubernetesBackend:
    name = "kubernetes"

    def __init__(
        self, *, kubeconfig: str = "", namespace: str = "binder", suite: str = "binder"
    ) -> None:
        self._kubeconfig = kubeconfig
        self.namespace = namespace
        self._suite = suite
        self._selector = f"{SUITE_LABEL}={suite}"
        self._pods: dict[str, PodView] = {}
        self._deleting: set[str] = set()
        self._changed: dict[str, asyncio.Event] = {}
        self._closing = threading.Event()
        self._synced = threading.Event()
        self._notify: Notify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: Any = None
        self._apps: Any = None
        self._client_config: Any = None
        self.api_calls: dict[str, int] = {}
        """Calls made to the API server by verb (the watch's re-lists included)."""

    # --- connection ---------------------------------------------------------------------------

    def _load_config(self) -> Any:
        cfg = client.Configuration()
        if self._kubeconfig:
            config.load_kube_config(config_file=self._kubeconfig, client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
        return cfg

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        verb = fn.__name__.split("_", 1)[0]
        self.api_calls[verb] = self.api_calls.get(verb, 0) + 1
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except ApiException as exc:
            if exc.status and 400 <= exc.status < 500:
                raise
            raise BadBackendError(f"Kubernetes API answered {exc.status}: {exc.reason}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BadBackendError(f"Kubernetes API unreachable: {exc.__class__.__name__}") from exc

    async def open(self, notify: Notify) -> None:
        self._notify = notify
        self._loop = asyncio.get_running_loop()
        try:
            self._client_config = await anyio.to_thread.run_sync(self._load_config)
        except (config.ConfigException, OSError) as exc:
            raise BadBackendError(f"no usable Kubernetes configuration: {exc}") from exc
        api_client = client.ApiClient(self._client_config)
        self._api = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        async def watch() -> None:
            await anyio.to_thread.run_sync(self._watch_forever, abandon_on_cancel=True)

        return {"pod watch": watch}

    async def close(self) -> None:
        self._closing.set()

    async def ping(self) -> None:
        try:
            await self._call(self._api.list_namespaced_pod, self.namespace, limit=1)
        except ApiException as exc:  # a 4xx left by _call: the suite cannot use the API
            raise BadBackendError(f"Kubernetes API answered {exc.status}: {exc.reason}") from exc

    # --- the watch ----------------------------------------------------------------------------

    def _watch_forever(self) -> None:
        api = client.CoreV1Api(client.ApiClient(self._client_config))
        delay = 0.2
        while not self._closing.is_set():
            try:
                self.api_calls["watch"] = self.api_calls.get("watch", 0) + 1
                listed = api.list_namespaced_pod(self.namespace, label_selector=self._selector)
                seen = {view(p).id: view(p) for p in listed.items}
                for dep_id in set(self._pods) - set(seen):  # deleted while we were not watching
                    self._deliver(
                        PodView(
                            dep_id,
                            self._pods[dep_id].template,
                            False,
                            None,
                            "pod was deleted",
                            gone=True,
                        )
                    )
                for pod in seen.values():
                    self._deliver(pod)
                self._synced.set()
                stream = watch.Watch().stream(
                    api.list_namespaced_pod,
                    self.namespace,
                    label_selector=self._selector,
                    resource_version=listed.metadata.resource_version if listed.metadata else None,
                    timeout_seconds=WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                )
                for event in stream:
                    if self._closing.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._deliver(view(event["object"], gone=event["type"] == "DELETED"))
                delay = 0.2
            except ApiException as exc:
                if exc.status != 410:  # 410: the watch expired; list again at once
                    logger.warning("pod watch: API answered {}; watching again", exc.status)
                    self._closing.wait(delay)
                    delay = min(delay * 2, 5.0)
            except Exception as exc:  # the API server went away: list and watch again
                logger.warning("pod watch interrupted ({}); watching again", exc.__class__.__name__)
                self._closing.wait(delay)
                delay = min(delay * 2, 5.0)

    def _deliver(self, pod: PodView) -> None:
        if not pod.id or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._apply, pod)

    def _apply(self, pod: PodView) -> None:
        before = self._pods.get(pod.id)
        if pod.gone:
            self._pods.pop(pod.id, None)
        else:
            self._pods[pod.id] = pod
        event = self._changed.get(pod.id)
        if event is not None:
            event.set()
        was_running = before is not None and before.failure is None
        if pod.gone and pod.id in self._deleting:  # our own deletion: nobody to tell
            self._deleting.discard(pod.id)
            return
        if self._notify is not None and pod.failure and (was_running or pod.gone):
            obs = Observed(
                pod.id, State.EXITED, None, {"pod": pod_name(pod.id)}, pod.failure, pod.template
            )
            asyncio.get_running_loop().create_task(self._notify(obs))

    # --- the port -----------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> Observed:
        manifest = make_pod(spec, namespace=self.namespace, suite=self._suite)
        try:
            await self._call(self._api.create_namespaced_pod, self.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:  # 409: it exists already (a resumed launch)
                raise LaunchError(
                    f"Kubernetes refused the pod: {exc.reason} {exc.body}"[:500]
                ) from exc
        ref = {"pod": pod_name(spec.id), "namespace": self.namespace}
        return Observed(spec.id, State.STARTING, None, ref, None, spec.template.name)

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        event = self._changed.setdefault(spec.id, asyncio.Event())
        try:
            while True:
                pod = self._pods.get(spec.id)
                if pod is not None and pod.failure:
                    raise LaunchError(pod.failure)
                if pod is not None and pod.ready and pod.ip:
                    target = f"http://{pod.ip}:{spec.template.port}"
                    return Observed(
                        spec.id, State.RUNNING, target, observed.ref, None, pod.template
                    )
                if pod is None and self._synced.is_set() and observed.state is State.RUNNING:
                    raise LaunchError("pod was deleted")
                event.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LaunchError("timed out waiting for the pod to become ready")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=left)
        finally:
            self._changed.pop(spec.id, None)

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        self._deleting.add(dep_id)
        try:
            await self._call(
                self._api.delete_namespaced_pod,
                pod_name(dep_id),
                self.namespace,
                grace_period_seconds=5,
            )
        except ApiException as exc:
            self._deleting.discard(dep_id)
            if exc.status != 404:
                raise BadBackendError(
                    f"Kubernetes refused to delete the pod: {exc.reason}"
                ) from exc

    async def list(self) -> list[Observed]:
        listed = await self._call(
            self._api.list_namespaced_pod, self.namespace, label_selector=self._selector
        )
        out = []
        for pod in listed.items:
            v = view(pod)
            if not v.id or pod.metadata.deletion_timestamp is not None:
                continue  # not ours, or already on its way out
            state = State.EXITED if v.failure else State.RUNNING if v.ready else State.STARTING
            target = None
            if v.ip:
                ports = pod.spec.containers[0].ports or []
                target = f"http://{v.ip}:{ports[0].container_port}" if ports else None
            out.append(
                Observed(v.id, state, target, {"pod": pod.metadata.name}, v.failure, v.template)
            )
        return out

    # --- preloading: a DaemonSet that runs the image on every node ------------------------------

    def _preload_name(self, template: Template) -> str:
        return f"binder-preload-{template.name.lower().replace('_', '-').replace('.', '-')}"[:63]

    async def preload(self, template: Template) -> None:
        name = self._preload_name(template)
        labels = {SUITE_LABEL + "-preload": self._suite, "binder.template": template.name}
        manifest = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "pull",
                                "image": template.image_source or template.image_name,
                                "command": ["sleep", "3600"],
                                "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}},
                            }
                        ],
                    },
                },
            },
        }
        with contextlib.suppress(ApiException):
            await self._call(self._apps.delete_namespaced_daemon_set, name, self.namespace)
        for _ in range(50):
            try:
                await self._call(self._apps.create_namespaced_daemon_set, self.namespace, manifest)
                return
            except ApiException as exc:
                if exc.status != 409:  # still being deleted: try again shortly
                    raise BadBackendError(f"Kubernetes refused the preload: {exc.reason}") from exc
                await anyio.sleep(0.1)

    async def preload_status(self, template: Template) -> str:
        try:
            ds = await self._call(
                self._apps.read_namespaced_daemon_set, self._preload_name(template), self.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return "completed"
            raise BadBackendError(f"Kubernetes API answered {exc.status}") from exc
        st = ds.status
        desired = st.desired_number_scheduled if st else 0
        done = bool(st and desired and (st.number_ready or 0) >= desired)
        return "completed" if done else "loading"
