"""The ``kubernetes`` backend: one Pod per deployment, its state taken from a watch.

The official client is synchronous: calls run in worker threads, one thread keeps a watch on the
suite's pods and one on the namespace's events (each listing again after the API server restarts
or the watch expires). Launch costs one API write (the Pod), stop one (its deletion); nothing
polls. The Pods' events (Scheduled, Pulling, Pulled, Started, probe failures) become progress
messages. The only module that imports ``kubernetes`` (the manifests and what is read from the
objects live in ``kube_objects``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from loguru import logger

from services.deploy_kubernetes.backends.base import (
    LaunchSpec,
    Notify,
    Observed,
    State,
    in_daemon_thread,
)
from services.deploy_kubernetes.backends.kube_objects import (
    SUITE_LABEL,
    PodView,
    event_message,
    make_pod,
    make_preload,
    pod_name,
    preload_labels,
    preload_name,
    preload_state,
    view,
    with_log,
)
from services.deploy_kubernetes.errors import BadBackendError, LaunchError
from services.deploy_kubernetes.models import Template

T = TypeVar("T")
WATCH_SECONDS = 240


class KubernetesBackend:
    name = "kubernetes"
    ready_at_target = False

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
        self._tasks: set[asyncio.Task[None]] = set()
        self.api_calls: dict[str, int] = {}
        """Calls made to the API server by verb (the watches' re-lists included)."""

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

    def _watches(self) -> dict[str, Callable[[Any], None]]:
        return {"pod watch": self._watch_pods, "event watch": self._watch_events}

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The pod watch and the event watch, each a thread's work run as a supervised loop."""

        def loop(once: Callable[[Any], None], name: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                await in_daemon_thread(self._watch_forever, once, name)

            return run

        return {name: loop(once, name) for name, once in self._watches().items()}

    async def close(self) -> None:
        self._closing.set()

    async def ping(self) -> None:
        try:
            await self._call(self._api.list_namespaced_pod, self.namespace, limit=1)
        except ApiException as exc:  # a 4xx left by _call: the suite cannot use the API
            raise BadBackendError(f"Kubernetes API answered {exc.status}: {exc.reason}") from exc

    # --- the watches --------------------------------------------------------------------------

    def _watch_forever(self, once: Callable[[Any], None], name: str) -> None:
        """Run ``once`` (a list, then a watch from there) again until closed, backing off while
        the API server is away."""
        api = client.CoreV1Api(client.ApiClient(self._client_config))
        delay = 0.2
        while not self._closing.is_set():
            try:
                self.api_calls["watch"] = self.api_calls.get("watch", 0) + 1
                once(api)
                delay = 0.2
            except ApiException as exc:
                if exc.status != 410:  # 410: the watch expired; list again at once
                    logger.warning("{}: API answered {}; watching again", name, exc.status)
                    self._closing.wait(delay)
                    delay = min(delay * 2, 5.0)
            except Exception as exc:  # the API server went away: list and watch again
                logger.warning("{} interrupted ({}); watching again", name, exc.__class__.__name__)
                self._closing.wait(delay)
                delay = min(delay * 2, 5.0)

    def _watch_pods(self, api: Any) -> None:
        listed = api.list_namespaced_pod(self.namespace, label_selector=self._selector)
        seen = {view(p).id: view(p) for p in listed.items}
        for dep_id in set(self._pods) - set(seen):  # deleted while we were not watching
            template = self._pods[dep_id].template
            self._deliver(PodView(dep_id, template, False, None, "pod was deleted", gone=True))
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

    def _watch_events(self, api: Any) -> None:
        """The namespace's Pod events from now on, told as progress of the suite's pods."""
        listed = api.list_namespaced_event(self.namespace, limit=1)
        stream = watch.Watch().stream(
            api.list_namespaced_event,
            self.namespace,
            field_selector="involvedObject.kind=Pod",
            resource_version=listed.metadata.resource_version if listed.metadata else None,
            timeout_seconds=WATCH_SECONDS,
        )
        for event in stream:
            if self._closing.is_set():
                return
            found = event_message(event["object"]) if event["type"] == "ADDED" else None
            if found is not None and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the event loop has closed
                    self._loop.call_soon_threadsafe(self._progress, *found)

    def _progress(self, name: str, message: str) -> None:
        dep_id = name.removeprefix("binder-")
        if dep_id != name and not dep_id.startswith("preload-") and self._notify is not None:
            obs = Observed(dep_id, State.STARTING, event=message)
            self._spawn(self._notify(obs))

    def _deliver(self, pod: PodView) -> None:
        if not pod.id or self._loop is None or self._closing.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
            self._loop.call_soon_threadsafe(self._apply, pod)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _apply(self, pod: PodView) -> None:
        before = self._pods.get(pod.id)
        if pod.gone:
            self._pods.pop(pod.id, None)
        else:
            self._pods[pod.id] = pod
        event = self._changed.get(pod.id)
        if event is not None:
            event.set()
        if pod.ready and (before is None or not before.ready) and self._notify is not None:
            self._spawn(self._notify(Observed(pod.id, State.STARTING, event="Ready: pod is ready")))
        was_running = before is not None and before.failure is None
        if pod.id in self._deleting:  # our own deletion (its container ends too): nobody to tell
            if pod.gone:
                self._deleting.discard(pod.id)
            return
        if pod.failure and (was_running or pod.gone):
            self._spawn(self._tell_exit(pod))

    async def _tell_exit(self, pod: PodView) -> None:
        if self._notify is None:
            return
        reason = await self._failure(pod)
        ref = {"pod": pod_name(pod.id)}
        await self._notify(Observed(pod.id, State.EXITED, None, ref, reason, pod.template))

    async def _failure(self, pod: PodView) -> str:
        """The pod's failure, with the end of its container's log once it ran and ended."""
        reason = pod.failure or "the pod failed"
        if not pod.exited or pod.gone:
            return reason
        try:
            log = await self._call(
                self._api.read_namespaced_pod_log,
                pod_name(pod.id),
                self.namespace,
                container="app",
                tail_lines=20,
            )
        except (ApiException, BadBackendError) as exc:
            logger.bind(id=pod.id).warning("no log of the exited container: {}", exc)
            return reason
        return with_log(reason, str(log))

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
                    raise LaunchError(await self._failure(pod))
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

    # --- preloading: a DaemonSet whose pods pull the image on every node ------------------------

    async def preload(self, template: Template) -> None:
        name = preload_name(template)
        manifest = make_preload(template, namespace=self.namespace, suite=self._suite)
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
        """``completed`` once every node has the image; a failed pull raises ``LaunchError``."""
        try:
            ds = await self._call(
                self._apps.read_namespaced_daemon_set, preload_name(template), self.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return "completed"
            raise BadBackendError(f"Kubernetes API answered {exc.status}") from exc
        labels = preload_labels(template, suite=self._suite)
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        pods = await self._call(
            self._api.list_namespaced_pod, self.namespace, label_selector=selector
        )
        state, failure = preload_state(ds, list(pods.items))
        if failure is not None:
            raise LaunchError(failure)
        return state
