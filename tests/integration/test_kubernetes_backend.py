"""The kubernetes backend against a real cluster (scripts/kube-testenv: a control plane built from
source and one real node, kubelet with containerd and runc, pulling from a local registry that holds
the images of scripts/app-images). Apps really run: they answer at their pod's IP and through the
proxy, and failures carry the kubelet's reasons."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import EXAMPLE_COMMAND, ROOT, DeployServer, Proxy, port_open, wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException

TESTENV = str(ROOT / "scripts" / "kube-testenv")
TEMPLATE = {
    "image-source": "binder-example:latest",
    "command": list(EXAMPLE_COMMAND),
    "port": 8888,
    "limits": {"memory": "128Mi", "cpu": "250m"},
    "env": {"GREETING": "hello"},
}


def _kube_server(
    deploy_factory: Callable[..., DeployServer],
    kube: tuple[str, Any],
    namespace: str,
    *,
    launch_timeout_seconds: float,
) -> DeployServer:
    """A deploy server on the test cluster's ``namespace``, started."""
    server = deploy_factory(backend="kubernetes", launch_timeout_seconds=launch_timeout_seconds)
    server.config.write_text(
        server.config.read_text()
        + f'[deploy.kubernetes]\nkubeconfig = "{kube[0]}"\nnamespace = "{namespace}"\n'
    )
    server.start()
    return server


@pytest.fixture
def kube_deploy(
    deploy_factory: Callable[..., DeployServer], kube: tuple[str, Any], namespace: str
) -> DeployServer:
    server = _kube_server(deploy_factory, kube, namespace, launch_timeout_seconds=90)
    put = httpx.put(f"{server.url}/templates/nb", json=TEMPLATE, headers=server.auth)
    assert put.status_code == 200, put.text
    return server


def _put(server: DeployServer, name: str, **template: Any) -> None:
    body = {**TEMPLATE, **template}
    put = httpx.put(f"{server.url}/templates/{name}", json=body, headers=server.auth)
    assert put.status_code == 200, put.text


def _pods(kube: tuple[str, Any], namespace: str) -> list[Any]:
    return list(
        client.CoreV1Api(kube[1])
        .list_namespaced_pod(namespace, label_selector="binder.suite")
        .items
    )


def _pod_events(kube: tuple[str, Any], namespace: str, dep_id: str) -> list[str]:
    events = client.CoreV1Api(kube[1]).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name=binder-{dep_id}"
    )
    return [f"{e.reason}: {e.message}" for e in events.items]


def _process_status(dep_id: str) -> dict[str, str]:
    """``/proc/<pid>/status`` of the app's process, as this host (the test node) sees it: the one
    whose environment names the deployment (no user namespace: its ids are the host's)."""
    wanted = f"BINDER_ID={dep_id}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and wanted in (proc / "environ").read_bytes().split(b"\0"):
                text = (proc / "status").read_text()
                return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}
        except OSError:  # gone meanwhile, or a kernel thread's
            continue
    raise AssertionError(f"no process of {dep_id} on this host")


def _fresh_image(base: str) -> str:
    """A new name for a built image, pushed to the registry: no node has it yet."""
    name = f"binder-test/fresh-{secrets.token_hex(4)}:1"
    subprocess.run(["docker", "tag", base, name], check=True, capture_output=True)
    push = subprocess.run([TESTENV, "push", name], capture_output=True, text=True, timeout=120)
    assert push.returncode == 0, push.stderr
    subprocess.run(["docker", "rmi", name], check=True, capture_output=True)
    return name


def test_shipped_example_answers_at_its_pod_and_through_the_proxy_until_deleted(
    kube_deploy: DeployServer, proxy: Proxy, kube: tuple[str, Any], namespace: str
) -> None:
    dep_id = kube_deploy.launch("example")
    info = kube_deploy.wait_status(dep_id, "deployed", "failed", timeout=90)
    assert info["status"] == "deployed", info
    (pod,) = _pods(kube, namespace)
    assert pod.metadata.labels["binder.id"] == dep_id
    assert pod.spec.automount_service_account_token is False
    (container,) = pod.spec.containers
    assert container.image == "binder-example:latest"
    assert container.resources.limits == {"memory": "256Mi", "cpu": "1"}
    target = f"http://{pod.status.pod_ip}:8888"
    assert proxy.routes()[f"/user/{dep_id}"]["target"] == target

    direct = httpx.get(f"{target}/user/{dep_id}/", timeout=5)
    assert direct.status_code == 200
    assert "Hello from Binder" in direct.text
    through = proxy.get(f"/user/{dep_id}/")
    assert through.status_code == 200
    assert dep_id in through.text

    r = httpx.delete(f"{kube_deploy.url}/applications/example/{dep_id}", headers=kube_deploy.auth)
    assert r.json()["status"] == "deleted"
    wait_for(lambda: not _pods(kube, namespace), timeout=30, what="the pod to be deleted")
    assert f"/user/{dep_id}" not in proxy.routes()
    assert proxy.get(f"/user/{dep_id}/").status_code == 404


def test_missing_image_fails_with_the_pull_reason(kube_deploy: DeployServer) -> None:
    _put(kube_deploy, "missing", **{"image-source": "binder-test/missing:1"})
    dep_id = kube_deploy.launch("missing")
    info = kube_deploy.wait_status(dep_id, "failed", "deployed", timeout=60, template="missing")
    assert info["status"] == "failed"
    assert info["reason"].startswith("image pull failed for binder-test/missing:1")


def test_exiting_app_fails_with_its_code_and_log_tail(kube_deploy: DeployServer) -> None:
    _put(kube_deploy, "exits", **{"image-source": "binder-test/exit:1", "command": ["/bin/app"]})
    dep_id = kube_deploy.launch("exits")
    info = kube_deploy.wait_status(dep_id, "failed", "deployed", timeout=60, template="exits")
    assert info["status"] == "failed"
    assert "container exited with code 3" in info["reason"]
    assert "something went wrong" in info["reason"]


def test_memory_hog_fails_as_oom_killed(kube_deploy: DeployServer) -> None:
    _put(
        kube_deploy,
        "hog",
        **{"image-source": "binder-test/hog:1", "command": ["/bin/app"]},
        limits={"memory": "32Mi", "cpu": "250m"},
    )
    dep_id = kube_deploy.launch("hog")
    info = kube_deploy.wait_status(dep_id, "failed", "deployed", timeout=60, template="hog")
    assert info["status"] == "failed"
    assert "OOMKilled" in info["reason"]


def test_unschedulable_template_fails_with_that_reason(kube_deploy: DeployServer) -> None:
    _put(kube_deploy, "huge", limits={"cpu": "100", "memory": "1Gi"})
    dep_id = kube_deploy.launch("huge")
    info = kube_deploy.wait_status(dep_id, "failed", "deployed", template="huge")
    assert info["status"] == "failed"
    assert info["reason"].startswith("unschedulable")
    assert "Insufficient cpu" in info["reason"]


def test_app_that_never_becomes_ready_times_out(
    deploy_factory: Callable[..., DeployServer], kube: tuple[str, Any], namespace: str
) -> None:
    server = _kube_server(deploy_factory, kube, namespace, launch_timeout_seconds=8)
    _put(server, "unready", **{"image-source": "binder-test/unready:1", "command": ["/bin/app"]})
    dep_id = server.launch("unready")
    info = server.wait_status(dep_id, "failed", "deployed", timeout=60, template="unready")
    assert info["status"] == "failed"
    # the server's own probe's reason: the kubelet's readiness probe is not what it waits for
    assert info["reason"].startswith(
        "timed out after 8 s waiting for the app to listen on port 8888; last output lines: "
    )
    assert "up, but not listening" in info["reason"]  # the app's own words, from its pod
    wait_for(lambda: not _pods(kube, namespace), timeout=30, what="the pod to be removed")


def test_a_pod_whose_app_does_not_listen_yet_stays_deploying(
    kube_deploy: DeployServer, kube: tuple[str, Any], namespace: str
) -> None:
    """The container runs (the watch tells the server so, with the pod's IP) seconds before the
    app listens: the launch is deployed once the app answers the server's probe, not before."""
    _put(kube_deploy, "slow", command=[*EXAMPLE_COMMAND, "--delay", "8"])
    dep_id = kube_deploy.launch("slow")
    core = client.CoreV1Api(kube[1])

    def running() -> tuple[str, bool] | None:
        """Once the container runs: the launch's status, then whether the app listens."""
        pod = core.read_namespaced_pod(f"binder-{dep_id}", namespace).status
        if pod is None or not pod.pod_ip:
            return None
        (state,) = [c.state for c in pod.container_statuses or []] or [None]
        if state is None or not state.running:
            return None
        status = kube_deploy.status(dep_id, "slow")["status"]
        return status, port_open(8888, pod.pod_ip)

    seen = wait_for(
        running,
        timeout=60,
        interval=0.02,
        what="the pod's container to run",
        ignore=(ApiException,),  # the pod's creation may not have landed yet
    )
    assert seen == ("deploying", False)
    info = kube_deploy.wait_status(dep_id, "deployed", "failed", timeout=60, template="slow")
    assert info["status"] == "deployed", info
    (pod,) = _pods(kube, namespace)
    answer = httpx.get(f"http://{pod.status.pod_ip}:8888/user/{dep_id}/", timeout=5)
    assert answer.status_code == 200


def test_apps_run_unprivileged_under_the_default_seccomp_profile(
    kube_deploy: DeployServer, proxy: Proxy
) -> None:
    """What the app's process is, as the kernel sees it: not root, no capability, no way to gain
    one, and filtered system calls; the shipped example's image still serves so."""
    dep_id = kube_deploy.launch("example")
    info = kube_deploy.wait_status(dep_id, "deployed", "failed", timeout=90)
    assert info["status"] == "deployed", info
    assert proxy.get(f"/user/{dep_id}/").status_code == 200
    fields = _process_status(dep_id)
    assert fields["Uid"].split() == ["1000"] * 4
    assert fields["Gid"].split() == ["1000"] * 4
    assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 0
    assert int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # a filter


def test_preload_pulls_on_the_node_then_a_launch_pulls_nothing(
    kube_deploy: DeployServer, kube: tuple[str, Any], namespace: str
) -> None:
    image = _fresh_image("binder-example:latest")
    _put(kube_deploy, "fresh", **{"image-source": image})
    r = httpx.post(f"{kube_deploy.url}/preload/fresh", headers=kube_deploy.auth)
    assert r.status_code == 200
    assert r.json()["status"] == "loading"
    wait_for(
        lambda: (
            httpx.get(f"{kube_deploy.url}/preload/fresh", headers=kube_deploy.auth).json()["status"]
            == "completed"
        ),
        timeout=60,
        what="the preload to complete",
    )
    dep_id = kube_deploy.launch("fresh")
    assert kube_deploy.wait_status(dep_id, "deployed", "failed", template="fresh")["status"] == (
        "deployed"
    )
    events = _pod_events(kube, namespace, dep_id)
    assert not [e for e in events if e.startswith("Pulling")], events
    assert [e for e in events if e.startswith("Pulled") and "already present" in e], events


def test_preload_of_a_missing_image_fails(kube_deploy: DeployServer) -> None:
    _put(kube_deploy, "gone", **{"image-source": "binder-test/never-pushed:1"})
    assert httpx.post(f"{kube_deploy.url}/preload/gone", headers=kube_deploy.auth).is_success
    answer = wait_for(
        lambda: (
            r
            if (
                r := httpx.get(f"{kube_deploy.url}/preload/gone", headers=kube_deploy.auth)
            ).status_code
            != 200
            else None
        ),
        timeout=60,
        what="the preload to fail",
    )
    assert answer.status_code == 502, answer.text
    assert answer.json()["type"] == "launchFailed"
    assert "binder-test/never-pushed:1" in answer.json()["error"]


def test_events_stream_shows_the_pods_progress(kube_deploy: DeployServer) -> None:
    _put(kube_deploy, "fresh", **{"image-source": _fresh_image("binder-example:latest")})
    dep_id = kube_deploy.launch("fresh")
    progress: list[str] = []
    statuses: list[str] = []
    url = f"{kube_deploy.url}/applications/fresh/{dep_id}/events"
    with httpx.stream("GET", url, timeout=90) as stream:
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if kind == "progress":
                    progress.append(data["message"])
                else:
                    statuses.append(data["status"])
                    if data["status"] != "deploying":  # the stream goes on while the app lives
                        break
    assert statuses[-1] == "deployed", (statuses, progress)
    reasons = [m.split(":", 1)[0] for m in progress]
    for step in ("Scheduled", "Pulling", "Pulled", "Started"):
        assert step in reasons, progress
    assert reasons.index("Pulling") < reasons.index("Pulled") < reasons.index("Started")


def test_app_survives_a_kubelet_restart(
    kube_deploy: DeployServer, proxy: Proxy, kube: tuple[str, Any], namespace: str
) -> None:
    dep_id = kube_deploy.launch("nb")
    kube_deploy.wait_status(dep_id, "deployed", timeout=60, template="nb")
    (before,) = _pods(kube, namespace)
    restart = subprocess.run(
        [TESTENV, "restart-kubelet"], capture_output=True, text=True, timeout=180
    )
    assert restart.returncode == 0, restart.stderr
    wait_for(
        lambda: all(
            c.ready for p in _pods(kube, namespace) for c in p.status.container_statuses or []
        ),
        timeout=60,
        what="the kubelet to find the container ready again",
    )
    (after,) = _pods(kube, namespace)
    assert after.metadata.uid == before.metadata.uid
    assert after.status.container_statuses[0].restart_count == 0
    assert kube_deploy.status(dep_id, "nb")["status"] == "deployed"
    assert proxy.get(f"/user/{dep_id}/").status_code == 200


def test_watch_survives_an_api_server_restart(
    kube_deploy: DeployServer, proxy: Proxy, kube: tuple[str, Any], namespace: str
) -> None:
    dep_id = kube_deploy.launch("nb")
    kube_deploy.wait_status(dep_id, "deployed", timeout=60, template="nb")
    restart = subprocess.run(
        [TESTENV, "restart-apiserver"], capture_output=True, text=True, timeout=180
    )
    assert restart.returncode == 0, restart.stderr
    assert kube_deploy.status(dep_id, "nb")["status"] == "deployed"
    assert proxy.get(f"/user/{dep_id}/").status_code == 200
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
    orphan: Any = {  # a manifest as a dict, which the client takes
        "metadata": {
            "name": "binder-" + "e" * 32,
            "labels": {"binder.suite": "binder", "binder.id": "e" * 32, "binder.template": "nb"},
        },
        "spec": {"containers": [{"name": "app", "image": "binder-test/unready:1"}]},
    }
    client.CoreV1Api(kube[1]).create_namespaced_pod(namespace, orphan)
    kube_deploy.start()
    final = {
        i: kube_deploy.wait_status(i, "deployed", "failed", timeout=90, template="nb") for i in ids
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
