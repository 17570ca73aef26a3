"""The kubernetes backend against a real control plane (scripts/kube-testenv: etcd, kube-apiserver,
kube-scheduler, kube-controller-manager built from source, kwok simulating two nodes)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from harness import ROOT, DeployServer, Proxy, wait_for
from kubernetes import client

TEMPLATE = {
    "image-source": "binder/example:1",
    "command": ["python3", "-m", "http.server", "{port}"],
    "port": 8888,
    "limits": {"memory": "128Mi", "cpu": "250m"},
    "env": {"GREETING": "hello"},
}


@pytest.fixture
def kube_deploy(
    deploy_factory: Callable[..., DeployServer], kube: tuple[str, Any], namespace: str
) -> DeployServer:
    server = deploy_factory(backend="kubernetes")
    server.config.write_text(
        server.config.read_text()
        + f'[deploy.kubernetes]\nkubeconfig = "{kube[0]}"\nnamespace = "{namespace}"\n'
    )
    server.start()
    put = httpx.put(f"{server.url}/templates/nb", json=TEMPLATE, headers=server.auth)
    assert put.status_code == 200, put.text
    return server


def _pods(kube: tuple[str, Any], namespace: str) -> list[Any]:
    return list(
        client.CoreV1Api(kube[1])
        .list_namespaced_pod(namespace, label_selector="binder.suite")
        .items
    )


def test_launch_creates_a_labelled_limited_pod_without_token_routed_by_ip(
    kube_deploy: DeployServer, proxy: Proxy, kube: tuple[str, Any], namespace: str
) -> None:
    dep_id = kube_deploy.launch("nb")
    info = kube_deploy.wait_status(dep_id, "deployed", "failed", template="nb")
    assert info["status"] == "deployed", info
    (pod,) = _pods(kube, namespace)
    assert pod.metadata.labels == {
        "binder.suite": "binder",
        "binder.id": dep_id,
        "binder.template": "nb",
    }
    assert pod.spec.automount_service_account_token is False
    assert not any(v.projected or v.secret for v in pod.spec.volumes or [])
    (container,) = pod.spec.containers
    assert container.resources.limits == {"memory": "128Mi", "cpu": "250m"}
    assert container.image == "binder/example:1"
    assert proxy.routes()[f"/user/{dep_id}"]["target"] == f"http://{pod.status.pod_ip}:8888"

    r = httpx.delete(f"{kube_deploy.url}/applications/nb/{dep_id}", headers=kube_deploy.auth)
    assert r.json()["status"] == "deleted"
    wait_for(lambda: not _pods(kube, namespace), timeout=30, what="the pod to be deleted")
    assert f"/user/{dep_id}" not in proxy.routes()


def test_unschedulable_template_fails_with_that_reason(kube_deploy: DeployServer) -> None:
    huge = {**TEMPLATE, "limits": {"cpu": "100", "memory": "1Gi"}}
    assert (
        httpx.put(
            f"{kube_deploy.url}/templates/huge", json=huge, headers=kube_deploy.auth
        ).status_code
        == 200
    )
    dep_id = kube_deploy.launch("huge")
    info = kube_deploy.wait_status(dep_id, "failed", "deployed", template="huge")
    assert info["status"] == "failed"
    assert info["reason"].startswith("unschedulable")
    assert "Insufficient cpu" in info["reason"]


def test_pod_deleted_behind_the_servers_back_makes_the_record_final(
    kube_deploy: DeployServer, kube: tuple[str, Any], namespace: str
) -> None:
    dep_id = kube_deploy.launch("nb")
    kube_deploy.wait_status(dep_id, "deployed", template="nb")
    client.CoreV1Api(kube[1]).delete_namespaced_pod(
        f"binder-{dep_id}", namespace, grace_period_seconds=0
    )
    info = kube_deploy.wait_status(dep_id, "failed", timeout=30, template="nb")
    assert "deleted" in info["reason"]


def test_watch_survives_an_api_server_restart(
    kube_deploy: DeployServer, kube: tuple[str, Any], namespace: str
) -> None:
    dep_id = kube_deploy.launch("nb")
    kube_deploy.wait_status(dep_id, "deployed", template="nb")
    restart = subprocess.run(
        [str(ROOT / "scripts" / "kube-testenv"), "restart-apiserver"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert restart.returncode == 0, restart.stderr
    # changes after the restart still reach the server through its watch
    client.CoreV1Api(kube[1]).delete_namespaced_pod(
        f"binder-{dep_id}", namespace, grace_period_seconds=0
    )
    assert (
        "deleted" in kube_deploy.wait_status(dep_id, "failed", timeout=60, template="nb")["reason"]
    )
    again = kube_deploy.launch("nb")
    assert (
        kube_deploy.wait_status(again, "deployed", "failed", timeout=60, template="nb")["status"]
        == "deployed"
    )


def test_server_restart_mid_launch_leaves_no_orphan_pod(
    kube_deploy: DeployServer, kube: tuple[str, Any], namespace: str
) -> None:
    ids = [kube_deploy.launch("nb") for _ in range(4)]
    kube_deploy.kill9()
    orphan = {
        "metadata": {
            "name": "binder-" + "e" * 32,
            "labels": {"binder.suite": "binder", "binder.id": "e" * 32, "binder.template": "nb"},
        },
        "spec": {"containers": [{"name": "app", "image": "x"}]},
    }
    client.CoreV1Api(kube[1]).create_namespaced_pod(namespace, orphan)
    kube_deploy.start()
    final = {
        i: kube_deploy.wait_status(i, "deployed", "failed", timeout=60, template="nb") for i in ids
    }
    wait_for(
        lambda: (
            {
                p.metadata.labels["binder.id"]
                for p in _pods(kube, namespace)
                if p.metadata.deletion_timestamp is None
            }
            == {i for i, f in final.items() if f["status"] == "deployed"}
        ),
        timeout=30,
        what="only the deployed records' pods to remain",
    )


def test_preload_runs_the_image_on_every_node(kube_deploy: DeployServer) -> None:
    r = httpx.post(f"{kube_deploy.url}/preload/nb", headers=kube_deploy.auth)
    assert r.status_code == 200
    assert r.json()["status"] in ("loading", "completed")
    wait_for(
        lambda: (
            httpx.get(f"{kube_deploy.url}/preload/nb", headers=kube_deploy.auth).json()["status"]
            == "completed"
        ),
        timeout=60,
        what="the preload to complete",
    )
