"""The ``kubernetes`` backend: one Pod per deployment, its state taken from a watch.

The official client is synchronous: calls run in worker threads, one thread keeps a watch on the
suite's pods and one on the namespace's events (each listing again after the API server restarts
or the watch expires). Launch costs one API write (the Pod), stop one (its deletion); nothing
polls the API server. A launch is ready once the app answers the server's own probe at the pod's
IP, sent as soon as the watch tells that its container runs (:mod:`..readiness`, as on the other
backends), not once the kubelet's readiness probe has passed. The Pods' events (Scheduled,
Pulling, Pulled, Started, probe failures) become progress messages. The only module that imports
``kubernetes`` (the manifests and what is read from the objects live in :mod:`.objects`).
Everything the client raises is translated here: a failing or unreachable API server becomes
``BadBackendError``, a 4xx answer ``_Refused`` (a ``BadBackendError`` too), which the methods
expecting a 404 or a 409 handle, so that no ``ApiException`` crosses the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from loguru import logger

from services.deploy_kubernetes.backends.base import (
    LaunchSpec,
    Lines,
    Notify,
    Observed,
    State,
    in_daemon_thread,
    output_lines,
)
from services.deploy_kubernetes.backends.kubernetes.objects import (
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
)
from services.deploy_kubernetes.backends.readiness import StartTimes, wait_http
from services.deploy_kubernetes.errors import BadBackendError, LaunchError
from services.deploy_kubernetes.models import Template

T = TypeVar("T")
WATCH_SECONDS = 240
API_CALLS_AT_ONCE = 64
"""Calls to the API server under way at once, each on a worker thread of the backend's own and a
connection kept open to the API server: a burst's creates go out together (not 40 at a time, the
worker threads the event loop shares, on 10 kept connections, the client's default, each further
one a TLS handshake on both ends, dropped after its call)."""


class _Refused(BadBackendError):
    """A 4xx answer of the API server (404 and 409 are expected in places): handled by the
    methods that expect one; anywhere else a ``BadBackendError`` like any other failure."""

    def __init__(self, exc: ApiException) -> None:
        super().__init__(f"Kubernetes API answered {exc.status}: {exc.reason}")
        self.status: int = exc.status
        self.reason: str = exc.reason
        self.body: object = exc.body


class KubernetesBackend:
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
        """Set when the pod of a launch under way (``wait_ready``) changes."""
        self._vanished: dict[str, PodView] = {}
        """Pods of launches under way that the watch saw go."""
        self._starts = StartTimes()
        self._closing = threading.Event()
        self._synced = threading.Event()
        self._notify: Notify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: Any = None
        self._apps: Any = None
        self._client_config: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls = anyio.CapacityLimiter(API_CALLS_AT_ONCE)
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
        cfg.connection_pool_maxsize = API_CALLS_AT_ONCE
        return cfg

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        verb = fn.__name__.split("_", 1)[0]
        self.api_calls[verb] = self.api_calls.get(verb, 0) + 1
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._calls)
        except ApiException as exc:
            if exc.status and 400 <= exc.status < 500:
                raise _Refused(exc) from exc
            raise BadBackendError(f"Kubernetes API answered {exc.status}: {exc.reason}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BadBackendError(f"Kubernetes API unreachable: {exc.__class__.__name__}") from exc

    async def _json(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn``'s answer as the API server's JSON (see :mod:`.objects` for why not models)."""
        return _read(await self._call(fn, *args, _preload_content=False, **kwargs))

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
        await self._json(self._api.list_namespaced_pod, self.namespace, limit=1)

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
        listed = _read(
            api.list_namespaced_pod(
                self.namespace, label_selector=self._selector, _preload_content=False
            )
        )
        seen = {v.id: v for v in map(view, listed["items"])}
        for dep_id in set(self._pods) - set(seen):  # deleted while we were not watching
            template = self._pods[dep_id].template
            self._deliver(PodView(dep_id, template, False, None, "pod was deleted", gone=True))
        for pod in seen.values():
            self._deliver(pod)
        self._synced.set()
        events = _stream(
            api.list_namespaced_pod,
            self.namespace,
            label_selector=self._selector,
            resource_version=listed["metadata"].get("resourceVersion"),
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
        )
        for kind, pod in events:
            if self._closing.is_set():
                return
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._deliver(view(pod, gone=kind == "DELETED"))

    def _watch_events(self, api: Any) -> None:
        """The namespace's Pod events from now on, told as progress of the suite's pods."""
        listed = _read(api.list_namespaced_event(self.namespace, limit=1, _preload_content=False))
        events = _stream(
            api.list_namespaced_event,
            self.namespace,
            field_selector="involvedObject.kind=Pod",
            resource_version=listed["metadata"].get("resourceVersion"),
            timeout_seconds=WATCH_SECONDS,
        )
        for kind, event in events:
            if self._closing.is_set():
                return
            found = event_message(event) if kind == "ADDED" else None
            if found is not None and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the event loop has closed
                    self._loop.call_soon_threadsafe(self._progress, *found)

    def _progress(self, name: str, message: str) -> None:
        dep_id = name.removeprefix("binder-")
        if dep_id != name and not dep_id.startswith("preload-") and self._notify is not None:
            obs = Observed(id=dep_id, state=State.STARTING, event=message)
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
        event = self._changed.get(pod.id)
        if pod.gone:
            self._pods.pop(pod.id, None)
            if event is not None:  # a launch waits on it: it learns why it is gone
                self._vanished[pod.id] = pod
        else:
            self._pods[pod.id] = pod
        if event is not None:
            event.set()
        if pod.ready and (before is None or not before.ready) and self._notify is not None:
            self._spawn(
                self._notify(Observed(id=pod.id, state=State.STARTING, event="Ready: pod is ready"))
            )
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
        await self._notify(
            Observed(id=pod.id, state=State.EXITED, ref=ref, reason=reason, template=pod.template)
        )

    async def _failure(self, pod: PodView) -> str:
        """The pod's failure (the deploy server adds the app's last output lines, :meth:`output`)."""
        return pod.failure or "the pod failed"

    async def output(self, dep_id: str, *, lines: int) -> Lines:
        """The last lines of the app container's log; none before it has started or once its pod
        is gone."""
        try:
            log = await self._call(
                self._api.read_namespaced_pod_log,
                pod_name(dep_id),
                self.namespace,
                container="app",
                tail_lines=lines * 2 + 2,
            )
        except _Refused:  # no such pod, or its container has not started (400)
            return []
        return output_lines(str(log), lines)

    # --- the port -----------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> Observed:
        manifest = make_pod(spec, namespace=self.namespace, suite=self._suite)
        try:
            await self._json(self._api.create_namespaced_pod, self.namespace, manifest)
        except _Refused as exc:
            if exc.status != 409:  # 409: it exists already (a resumed launch)
                raise LaunchError(
                    f"Kubernetes refused the pod: {exc.reason} {exc.body}"[:500]
                ) from exc
        ref = {"pod": pod_name(spec.id), "namespace": self.namespace}
        return Observed(id=spec.id, state=State.STARTING, ref=ref, template=spec.template.name)

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        """Wait until the watch tells that the pod's container runs, then probe the app at the
        pod's IP from here (connect attempts, then HTTP, as on the other backends), so that the
        proxy, on this host too, reaches it as the probe did. The kubelet's readiness probe is
        not waited for: its period, not the app, set the pace."""
        event = self._changed.setdefault(spec.id, asyncio.Event())
        try:
            pod = await self._until_running(spec.id, observed, event, deadline=deadline)
            assert pod.ip is not None
            target = f"http://{pod.ip}:{spec.template.port}"
            await wait_http(
                target + spec.ready_path,
                deadline=deadline,
                alive=functools.partial(self._alive, spec.id),
                starts=self._starts,
                template=spec.template.name,
            )
        finally:
            self._changed.pop(spec.id, None)
            self._vanished.pop(spec.id, None)
        return Observed(
            id=spec.id, state=State.RUNNING, target=target, ref=observed.ref, template=pod.template
        )

    async def _until_running(
        self, dep_id: str, observed: Observed, event: asyncio.Event, *, deadline: float
    ) -> PodView:
        """The pod once its container runs with an IP; ``LaunchError`` when it cannot."""
        while True:
            reason = await self._alive(dep_id, resumed=observed.state is State.RUNNING)
            if reason is not None:
                raise LaunchError(reason)
            pod = self._pods.get(dep_id)
            if pod is not None and pod.running and pod.ip:
                return pod
            event.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise LaunchError("timed out waiting for the pod's container to start")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=left)

    async def _alive(self, dep_id: str, *, resumed: bool = True) -> str | None:
        """None while the pod may still serve; why it cannot, once it failed or vanished (a pod
        not seen yet is not missing while its creation may not have reached the watch)."""
        pod = self._pods.get(dep_id) or self._vanished.get(dep_id)
        if pod is not None and pod.failure:
            return await self._failure(pod)
        if pod is None and resumed and self._synced.is_set():
            return "pod was deleted"
        return None

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        self._deleting.add(dep_id)
        try:
            await self._json(
                self._api.delete_namespaced_pod,
                pod_name(dep_id),
                self.namespace,
                grace_period_seconds=5,
            )
        except _Refused as exc:
            self._deleting.discard(dep_id)
            if exc.status != 404:
                raise BadBackendError(
                    f"Kubernetes refused to delete the pod: {exc.reason}"
                ) from exc

    async def list(self) -> list[Observed]:
        listed = await self._json(
            self._api.list_namespaced_pod, self.namespace, label_selector=self._selector
        )
        out = []
        for pod in listed["items"]:
            v = view(pod)
            if not v.id or pod["metadata"].get("deletionTimestamp"):
                continue  # not ours, or already on its way out
            state = State.EXITED if v.failure else State.RUNNING if v.running else State.STARTING
            target = None
            if v.ip:
                ports = pod["spec"]["containers"][0].get("ports") or []
                target = f"http://{v.ip}:{ports[0]['containerPort']}" if ports else None
            out.append(
                Observed(
                    id=v.id,
                    state=state,
                    target=target,
                    ref={"pod": pod["metadata"]["name"]},
                    reason=v.failure,
                    template=v.template,
                )
            )
        return out

    # --- preloading: a DaemonSet whose pods pull the image on every node ------------------------

    async def preload(self, template: Template) -> None:
        name = preload_name(template)
        manifest = make_preload(template, namespace=self.namespace, suite=self._suite)
        with contextlib.suppress(_Refused):  # none there yet
            await self._json(self._apps.delete_namespaced_daemon_set, name, self.namespace)
        for _ in range(50):
            try:
                await self._json(self._apps.create_namespaced_daemon_set, self.namespace, manifest)
                return
            except _Refused as exc:
                if exc.status != 409:  # still being deleted: try again shortly
                    raise BadBackendError(f"Kubernetes refused the preload: {exc.reason}") from exc
                await anyio.sleep(0.1)

    async def preload_status(self, template: Template) -> str:
        """``completed`` once every node has the image; a failed pull raises ``LaunchError``."""
        try:
            ds = await self._json(
                self._apps.read_namespaced_daemon_set, preload_name(template), self.namespace
            )
        except _Refused as exc:
            if exc.status == 404:
                return "completed"
            raise BadBackendError(f"Kubernetes API answered {exc.status}") from exc
        labels = preload_labels(template, suite=self._suite)
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        pods = await self._json(
            self._api.list_namespaced_pod, self.namespace, label_selector=selector
        )
        state, failure = preload_state(ds, pods["items"])
        if failure is not None:
            raise LaunchError(failure)
        return state


def _read(response: Any) -> Any:
    """The JSON of an answer asked for unread (``_preload_content=False``); its connection goes
    back to the pool."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _stream(list_call: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """A watch through ``list_call``: (event type, object as JSON) as the API server sends them;
    an ERROR event (410 once the watch has expired) raises ``ApiException`` with its code.

    Why not the client's ``watch.Watch``: it builds the client's model of every event's object
    (0.55 ms of the watch's thread per pod, see :mod:`.objects`), and with ``deserialize=False``
    it cannot read an ERROR event (a ``KeyError``: ``tests/unit/test_builders.py`` holds it).
    Exit condition: use ``watch.Watch().stream(..., deserialize=False)`` once it reads ERROR
    events (the test then fails)."""
    response = list_call(*args, watch=True, _preload_content=False, **kwargs)
    try:
        for line in response:
            if not line.strip():
                continue
            event = json.loads(line)
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise ApiException(status=obj.get("code"), reason=obj.get("message"))
            if kind != "BOOKMARK":
                yield kind, obj
    finally:  # a watch left before its end leaves its connection unusable: closed
        response.close()
        response.release_conn()
