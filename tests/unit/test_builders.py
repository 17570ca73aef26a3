"""Pure builders of the container backends, compared with the objects they must produce."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from services.deploy_kubernetes.backends.base import LaunchSpec, output_lines
from services.deploy_kubernetes.backends.docker.spec import app_user, container_spec, network_name
from services.deploy_kubernetes.backends.kubernetes.backend import _stream
from services.deploy_kubernetes.backends.kubernetes.objects import (
    event_message,
    make_pod,
    make_preload,
    preload_state,
    view,
)
from services.deploy_kubernetes.models import Template

ID = "0123456789abcdef0123456789abcdef"
TEMPLATE = Template(
    name="nb",
    image_source="img:1",
    command=("serve", "--port={port}", "{base_url}"),
    port=8888,
    env={"A": "b"},
    limits={"memory": "512Mi", "cpu": "500m"},
)


def test_make_pod() -> None:
    pod = make_pod(LaunchSpec(id=ID, template=TEMPLATE), namespace="ns", suite="s1")
    assert pod == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"binder-{ID}",
            "namespace": "ns",
            "labels": {"binder.suite": "s1", "binder.id": ID, "binder.template": "nb"},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "app",
                    "image": "img:1",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["serve", "--port=8888", f"/user/{ID}/"],
                    "env": [
                        {"name": "A", "value": "b"},
                        {"name": "BASE_URL", "value": f"/user/{ID}/"},
                        {"name": "BINDER_ID", "value": ID},
                        {"name": "PORT", "value": "8888"},
                    ],
                    "ports": [{"name": "http", "containerPort": 8888}],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "readinessProbe": {
                        "httpGet": {"path": f"/user/{ID}/", "port": 8888},
                        "periodSeconds": 1,
                        "failureThreshold": 3,
                    },
                    "resources": {
                        "limits": {"memory": "512Mi", "cpu": "500m"},
                        "requests": {"memory": "512Mi", "cpu": "50m"},
                    },
                }
            ],
        },
    }


def test_container_spec() -> None:
    spec = container_spec(
        LaunchSpec(id=ID, template=TEMPLATE), suite="s1", network="s1-apps", user="65534:65534"
    )
    assert spec == {
        "image": "img:1",
        "command": ["serve", "--port=8888", f"/user/{ID}/"],
        "name": f"binder-{ID}",
        "detach": True,
        "init": True,
        "environment": {
            "HOME": "/tmp",
            "A": "b",
            "PORT": "8888",
            "BASE_URL": f"/user/{ID}/",
            "BINDER_ID": ID,
        },
        "labels": {"binder.suite": "s1", "binder.id": ID, "binder.template": "nb"},
        "ports": {"8888/tcp": ("127.0.0.1", None)},
        "user": "65534:65534",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": 1024,
        "network": "s1-apps",
        "tmpfs": {"/tmp": f"rw,exec,nosuid,nodev,size={512 * 2**20},mode=1777,uid=65534,gid=65534"},
        "log_config": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        "mem_limit": 512 * 2**20,
        "memswap_limit": 512 * 2**20,
        "nano_cpus": 500_000_000,
    }


def test_containers_never_run_as_root_and_networks_are_named_as_docker_allows() -> None:
    assert [app_user(u) for u in ("", "root", "0", "0:0", "root:staff")] == ["65534:65534"] * 5
    assert [app_user(u) for u in ("jovyan", "1000:100")] == ["jovyan", "1000:100"]
    assert network_name("binder-0123456789ab") == "binder-0123456789ab-apps"
    assert network_name("a b/c") == "a-b-c-apps"


JUPYTER = Template(
    name="jupyter",
    image_source="binder-jupyter:latest",
    command=("binder-jupyter", "--port={port}", "--ServerApp.base_url={base_url}"),
    env={"JUPYTER_TOKEN": "{token}", "PLAIN": "{nothing}"},
    ready_path="api",
)


def test_a_launch_token_reaches_the_env_not_the_command_and_readiness_has_its_path() -> None:
    spec = LaunchSpec(id=ID, template=JUPYTER, token="s3cret")
    assert JUPYTER.takes_token
    assert not TEMPLATE.takes_token
    assert "s3cret" not in repr(spec)
    docker = container_spec(spec, suite="s1", network="n", user="1000:1000")
    assert docker["command"] == [
        "binder-jupyter",
        "--port=8888",
        f"--ServerApp.base_url=/user/{ID}/",
    ]
    assert docker["environment"] == {
        "HOME": "/tmp",
        "JUPYTER_TOKEN": "s3cret",
        "PLAIN": "{nothing}",
        "PORT": "8888",
        "BASE_URL": f"/user/{ID}/",
        "BINDER_ID": ID,
        "BINDER_TOKEN": "s3cret",
    }
    container = make_pod(spec, namespace="ns", suite="s1")["spec"]["containers"][0]
    assert {"name": "BINDER_TOKEN", "value": "s3cret"} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == f"/user/{ID}/api"
    plain = LaunchSpec(id=ID, template=TEMPLATE)
    assert (
        "BINDER_TOKEN" not in container_spec(plain, suite="s", network="n", user="u")["environment"]
    )


def _json(model: Any) -> Any:
    """A client model as the API server sends it (its JSON, keys in camelCase), which the
    backend reads: the models only spell the fields right."""
    return client.ApiClient().sanitize_for_serialization(model)


def _pod(**status: Any) -> Any:
    return _json(
        client.V1Pod(
            metadata=client.V1ObjectMeta(labels={"binder.id": ID, "binder.template": "nb"}),
            status=client.V1PodStatus(**status),
        )
    )


def _container(state: client.V1ContainerState) -> client.V1ContainerStatus:
    return client.V1ContainerStatus(
        name="app", image="x", image_id="", ready=False, restart_count=0, state=state
    )


def test_pod_views_give_kubernetes_reasons() -> None:
    ready = view(
        _pod(
            phase="Running",
            pod_ip="10.0.0.5",
            conditions=[client.V1PodCondition(type="Ready", status="True")],
        )
    )
    assert (ready.ready, ready.ip, ready.failure) == (True, "10.0.0.5", None)
    started = view(
        _pod(
            phase="Running",
            pod_ip="10.0.0.6",
            container_statuses=[
                _container(client.V1ContainerState(running=client.V1ContainerStateRunning()))
            ],
        )
    )
    assert (started.running, started.ready, started.ip) == (True, False, "10.0.0.6")
    assert not view(_pod(phase="Pending", pod_ip="10.0.0.7")).running
    unschedulable = view(
        _pod(
            phase="Pending",
            conditions=[
                client.V1PodCondition(
                    type="PodScheduled",
                    status="False",
                    reason="Unschedulable",
                    message="0/2 nodes are available",
                )
            ],
        )
    )
    assert unschedulable.failure == "unschedulable: 0/2 nodes are available"
    pull = view(
        _pod(
            phase="Pending",
            container_statuses=[
                _container(
                    client.V1ContainerState(
                        waiting=client.V1ContainerStateWaiting(
                            reason="ErrImagePull", message="not found"
                        )
                    )
                )
            ],
        )
    )
    assert pull.failure == "image pull failed for x: not found"
    exited = view(
        _pod(
            phase="Failed",
            container_statuses=[
                _container(
                    client.V1ContainerState(
                        terminated=client.V1ContainerStateTerminated(
                            exit_code=137, reason="OOMKilled"
                        )
                    )
                )
            ],
        )
    )
    assert exited.failure == "container exited with code 137 (OOMKilled)"
    assert exited.exited
    assert view(_pod(phase="Running"), gone=True).failure == "pod was deleted"


def test_output_tail_and_event_messages() -> None:
    assert output_lines("a\n\nb\nc\n", 2) == ["b", "c"]
    assert output_lines("", 5) == []
    assert output_lines("\x1b[31mred\x1b[0m\tdone\r\n" + "x" * 400, 2) == [
        "red\tdone",
        "x" * 300 + " [...]",
    ]
    pulling = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="e"),
        involved_object=client.V1ObjectReference(kind="Pod", name=f"binder-{ID}"),
        reason="Pulling",
        message='Pulling image "img:1"',
    )
    assert event_message(_json(pulling)) == (f"binder-{ID}", 'Pulling: Pulling image "img:1"')
    other = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="e"),
        involved_object=client.V1ObjectReference(kind="Node", name="n"),
        reason="NodeReady",
    )
    assert event_message(_json(other)) is None
    created = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="e"),
        involved_object=client.V1ObjectReference(kind="Pod", name=f"binder-{ID}"),
        reason="Created",
        message="Created container app",
    )
    assert event_message(_json(created)) is None  # "Started" follows at once


def _preload_pod(state: client.V1ContainerState, image_id: str, uid: str = "ds1") -> Any:
    status = client.V1ContainerStatus(
        name="pull", image="img:1", image_id=image_id, ready=False, restart_count=0, state=state
    )
    owner = client.V1OwnerReference(api_version="apps/v1", kind="DaemonSet", name="d", uid=uid)
    return _json(
        client.V1Pod(
            metadata=client.V1ObjectMeta(owner_references=[owner]),
            spec=client.V1PodSpec(node_name="n1", containers=[]),
            status=client.V1PodStatus(container_statuses=[status]),
        )
    )


def test_preload_completes_when_every_node_has_the_image() -> None:
    manifest = make_preload(TEMPLATE, namespace="ns", suite="s1")
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("img:1", "IfNotPresent")
    # its pods run as the apps' do: never root, no capability
    pod = make_pod(LaunchSpec(id=ID, template=TEMPLATE), namespace="ns", suite="s1")
    assert manifest["spec"]["template"]["spec"]["securityContext"] == pod["spec"]["securityContext"]
    assert container["securityContext"] == pod["spec"]["containers"][0]["securityContext"]
    two = _json(
        client.V1DaemonSet(
            metadata=client.V1ObjectMeta(uid="ds1"),
            spec=client.V1DaemonSetSpec(
                selector=client.V1LabelSelector(), template=client.V1PodTemplateSpec()
            ),
            status=client.V1DaemonSetStatus(
                current_number_scheduled=2,
                desired_number_scheduled=2,
                number_misscheduled=0,
                number_ready=0,
            ),
        )
    )
    running = client.V1ContainerState(running=client.V1ContainerStateRunning())
    pulling = client.V1ContainerState(
        waiting=client.V1ContainerStateWaiting(reason="ContainerCreating")
    )
    failed = client.V1ContainerState(
        waiting=client.V1ContainerStateWaiting(reason="ErrImagePull", message="not found")
    )
    assert preload_state(two, [_preload_pod(running, "sha256:1")]) == ("loading", None)
    assert preload_state(two, [_preload_pod(running, "sha256:1"), _preload_pod(pulling, "")]) == (
        "loading",
        None,
    )
    assert preload_state(
        two, [_preload_pod(running, "sha256:1"), _preload_pod(running, "sha256:1")]
    ) == ("completed", None)
    earlier = _preload_pod(running, "sha256:1", uid="ds0")
    assert preload_state(two, [earlier, earlier]) == ("loading", None)
    state, failure = preload_state(two, [_preload_pod(failed, "")])
    assert state == "loading"
    assert failure == "image pull failed for img:1 on node n1: not found"


class _Answer:
    """A watch's answer as urllib3 gives it unread: JSON lines."""

    def __init__(self, *events: dict[str, Any]) -> None:
        self._lines = [json.dumps(e).encode() + b"\n" for e in events]
        self.released = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._lines)

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        return iter(self._lines)

    def close(self) -> None:
        return None

    def release_conn(self) -> None:
        self.released = True


EXPIRED = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}


def test_the_backends_watch_reads_events_as_json_and_raises_an_expiry() -> None:
    pod = {"metadata": {"name": "p"}}
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}
    answer = _Answer({"type": "ADDED", "object": pod}, bookmark, EXPIRED)
    asked: dict[str, Any] = {}

    def listing(namespace: str, **kwargs: Any) -> _Answer:
        asked.update(kwargs, namespace=namespace)
        return answer

    events = _stream(listing, "ns", resource_version="7")
    assert next(events) == ("ADDED", pod)
    with pytest.raises(ApiException) as raised:  # the bookmark is skipped; the expiry raised
        next(events)
    assert raised.value.status == 410
    assert asked == {
        "namespace": "ns",
        "resource_version": "7",
        "watch": True,
        "_preload_content": False,
    }
    assert answer.released


def test_the_clients_watch_cannot_stream_json_through_an_expiry() -> None:
    """Why the backend reads its watches itself (``backend._stream``): the client's Watch, told
    not to build its models (``deserialize=False``), fails on the API server's ERROR event (an
    expired watch) with a KeyError, not its ApiException. When this fails, use the client's."""

    def list_namespaced_pod(namespace: str, **kwargs: Any) -> Any:
        return _Answer(EXPIRED)

    stream = watch.Watch().stream(list_namespaced_pod, "ns", timeout_seconds=1, deserialize=False)
    with pytest.raises(KeyError):
        next(stream)
