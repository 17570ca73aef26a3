"""Pure builders of the container backends, compared with the objects they must produce."""

from __future__ import annotations

from types import SimpleNamespace

from kubernetes import client

from services.deploy_kubernetes.backends.base import LaunchSpec
from services.deploy_kubernetes.backends.docker import container_spec
from services.deploy_kubernetes.backends.kube_objects import (
    event_message,
    make_pod,
    make_preload,
    preload_state,
    view,
    with_log,
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
    pod = make_pod(LaunchSpec(ID, TEMPLATE), namespace="ns", suite="s1")
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
    spec = container_spec(LaunchSpec(ID, TEMPLATE), suite="s1")
    assert spec == {
        "image": "img:1",
        "command": ["serve", "--port=8888", f"/user/{ID}/"],
        "name": f"binder-{ID}",
        "detach": True,
        "environment": {"A": "b", "PORT": "8888", "BASE_URL": f"/user/{ID}/", "BINDER_ID": ID},
        "labels": {"binder.suite": "s1", "binder.id": ID, "binder.template": "nb"},
        "ports": {"8888/tcp": ("127.0.0.1", None)},
        "mem_limit": 512 * 2**20,
        "nano_cpus": 500_000_000,
    }


def _pod(**status: object) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(labels={"binder.id": ID, "binder.template": "nb"}),
        status=client.V1PodStatus(**status),
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


def test_log_tail_and_event_messages() -> None:
    assert with_log("container exited with code 3", "a\n\nb\nc\n", lines=2) == (
        "container exited with code 3; last log lines: b | c"
    )
    assert with_log("container exited with code 3", "") == "container exited with code 3"
    pulling = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="e"),
        involved_object=client.V1ObjectReference(kind="Pod", name=f"binder-{ID}"),
        reason="Pulling",
        message='Pulling image "img:1"',
    )
    assert event_message(pulling) == (f"binder-{ID}", 'Pulling: Pulling image "img:1"')
    other = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="e"),
        involved_object=client.V1ObjectReference(kind="Node", name="n"),
        reason="NodeReady",
    )
    assert event_message(other) is None


def _preload_pod(state: client.V1ContainerState, image_id: str, uid: str = "ds1") -> client.V1Pod:
    status = client.V1ContainerStatus(
        name="pull", image="img:1", image_id=image_id, ready=False, restart_count=0, state=state
    )
    owner = client.V1OwnerReference(api_version="apps/v1", kind="DaemonSet", name="d", uid=uid)
    return client.V1Pod(
        metadata=client.V1ObjectMeta(owner_references=[owner]),
        spec=client.V1PodSpec(node_name="n1", containers=[]),
        status=client.V1PodStatus(container_statuses=[status]),
    )


def test_preload_completes_when_every_node_has_the_image() -> None:
    manifest = make_preload(TEMPLATE, namespace="ns", suite="s1")
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("img:1", "IfNotPresent")
    two = SimpleNamespace(
        metadata=SimpleNamespace(uid="ds1"), status=SimpleNamespace(desired_number_scheduled=2)
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
