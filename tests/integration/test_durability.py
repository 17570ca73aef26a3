"""Nothing acknowledged is lost: kill -9 of the database and of the deploy server, a crash in
the window between an app's start and the launch's return, an app dying while the database is
frozen.
All against the real database server, proxy, deploy server and app processes."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from harness import Database, DeployServer, Proxy, wait_for

from common.processes import alive
from services.deploy_kubernetes.__main__ import FAULT_RECORD_DELAY

pytestmark = pytest.mark.integration


def _delete(deploy: DeployServer, dep_id: str) -> dict[str, object]:
    response = httpx.delete(
        f"{deploy.url}/applications/example/{dep_id}", headers=deploy.auth, timeout=10
    )
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def _processes(deploy: DeployServer, dep_id: str) -> list[int]:
    """The processes of ``dep_id``'s app (its sandbox's cgroup, the kernel's view)."""
    return deploy.app_processes(dep_id)


def test_acknowledged_states_survive_kill9_of_database_then_deploy_server(
    own_db: Database, deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    deploy = deploy_factory(db=own_db).start()
    acknowledged: dict[str, str] = {}
    for _ in range(3):
        ids = [deploy.launch() for _ in range(3)]
        for dep_id in ids:
            deploy.wait_status(dep_id, "deployed", timeout=30)
        for dep_id in ids[:2]:
            assert _delete(deploy, dep_id)["status"] == "deleted"
            acknowledged[dep_id] = "deleted"
        acknowledged[ids[2]] = "deployed"
        late = deploy.launch()  # acknowledged an instant before the database dies
        own_db.kill9()
        own_db.start()
        deploy.kill9()
        deploy.start()
        info = deploy.wait_status(late, "deployed", "failed", timeout=60)
        acknowledged[late] = str(info["status"])
        for dep_id, status in acknowledged.items():
            assert deploy.status(dep_id)["status"] == status, dep_id
    shims = deploy.app_pids()  # one sandbox per running app
    for dep_id, status in acknowledged.items():
        running = _processes(deploy, dep_id)
        if status == "deployed":
            assert running, dep_id
            assert shims[dep_id] in running
            assert proxy.get(f"/user/{dep_id}/").status_code == 200
        else:
            assert running == [], dep_id
            assert f"/user/{dep_id}" not in proxy.routes()


def test_crash_right_after_the_launch_request_leaves_one_app_per_id(
    deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    # the entry point's fault-injection hook: a pause once the app runs, before the launch
    # returns to the engine (which then has not recorded where the app is)
    deploy = deploy_factory(environ={FAULT_RECORD_DELAY: "5"}).start()
    dep_id = deploy.launch()
    wait_for(lambda: len(_processes(deploy, dep_id)) > 1, timeout=10, what="the app to start")
    deploy.kill9()
    deploy.start()
    info = deploy.wait_status(dep_id, "deployed", timeout=30)
    assert info["status"] == "deployed"
    assert set(deploy.app_pids()) == {dep_id}  # one sandbox, found by its cgroup
    assert proxy.get(f"/user/{dep_id}/").status_code == 200
    # and the found app is watched: when it dies, its record says how
    deploy.kill_app(dep_id)
    failed = deploy.wait_status(dep_id, "failed", timeout=15)
    assert "SIGKILL" in str(failed["reason"])


def test_app_dying_while_database_is_frozen_ends_failed_once_it_is_back(
    own_db: Database, deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    deploy = deploy_factory(db=own_db).start()
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed", timeout=30)
    pid = deploy.app_pids()[dep_id]
    own_db.freeze()
    try:
        deploy.kill_app(dep_id)
        wait_for(lambda: not alive(pid), timeout=5, what="the app to die")
        # readiness follows the database: not ready while it does not answer
        wait_for(
            lambda: httpx.get(deploy.url + "/health", timeout=5).status_code == 503,
            timeout=10,
            what="/health to say not ready while the database is frozen",
        )
        detail = httpx.get(deploy.url + "/health", timeout=5).json()
        assert detail["database"] != "ok"
    finally:
        own_db.thaw()
    info = deploy.wait_status(dep_id, "failed", timeout=30)
    assert "SIGKILL" in str(info["reason"])
    wait_for(lambda: f"/user/{dep_id}" not in proxy.routes(), timeout=10, what="route removed")
    wait_for(
        lambda: httpx.get(deploy.url + "/health", timeout=5).status_code == 200,
        timeout=15,
        what="/health ready again",
    )


def test_apps_of_an_earlier_server_are_watched_until_they_end(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    deploy = deploy_factory().start()
    dying, deleted = deploy.launch(), deploy.launch()
    for dep_id in (dying, deleted):
        deploy.wait_status(dep_id, "deployed", timeout=30)
    deploy.kill9()
    deploy.start()  # the apps are no children of this server
    assert _delete(deploy, deleted)["status"] == "deleted"
    deploy.kill_app(dying)
    failed = deploy.wait_status(dying, "failed", timeout=10)
    assert "SIGKILL" in str(failed["reason"])  # the shim's status tells, whoever started it
    assert deploy.status(deleted)["status"] == "deleted", "a stop is no failure"


def test_a_launch_whose_record_cannot_be_written_answers_503_and_leaves_no_app(
    own_db: Database, deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    """The app starts while its record is written: when the write fails, the launch stops it."""
    deploy = deploy_factory(db=own_db).start()
    deploy.wait_status(deploy.launch(), "deployed", timeout=30)  # one app the suite keeps
    kept = set(deploy.app_pids())
    own_db.freeze()
    try:  # with the key: no launch window is hit first (it would wait on the database too)
        answer = httpx.post(f"{deploy.url}/applications/example", headers=deploy.auth, timeout=30)
    finally:
        own_db.thaw()
    assert answer.status_code == 503, answer.text
    assert answer.json()["type"] == "badDatabase"
    log = (deploy.workdir / "deploy.log").read_text()
    spawned = [line for line in log.splitlines() if "started in slot" in line]
    assert len(spawned) == 2  # the failed launch did start its app ...
    wait_for(lambda: set(deploy.app_pids()) == kept, timeout=10, what="no app left of it")
