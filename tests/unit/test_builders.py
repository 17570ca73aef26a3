"""Pure builders of the container backends, compared with the objects they must produce."""

from __future__ import annotations

from kubernetes import client

from services.deploy_kubernetes.backends.base import LaunchSpec
from services.deploy_kubernetes.backends.docker import container_spec
from services.deploy_kubernetes.backends.kubernetes import make_pod, view
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
                        "periodSeconds": 2,
                        "failureThreshold": 60,
                    },
                    "resources": {
                        "limits": {"memory": "512Mi", "cpu": "500m"},
                        "requests": {"memory": "512Mi", "cpu": "500m"},
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
    assert pull.failure == "image pull failed: not found"
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
    assert view(_pod(phase="Running"), gone=True).failure == "pod was deleted"
