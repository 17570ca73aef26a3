"""Fixtures starting the real components: the database server (one per session), a proxy and a
deploy server per test."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Database, DeployServer, Proxy, wait_for
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = Database(tmp_path_factory.mktemp("database")).start()
    yield db
    db.stop()


@pytest.fixture
def own_db(tmp_path: Path) -> Iterator[Database]:
    """A database of the test's own, to kill and freeze."""
    workdir = tmp_path / "own-db"
    workdir.mkdir()
    db = Database(workdir).start()
    yield db
    db.thaw()
    db.stop()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    p = Proxy(tmp_path).start()
    yield p
    p.stop()


@pytest.fixture
def deploy_factory(
    tmp_path: Path, database: Database, proxy: Proxy
) -> Iterator[Callable[..., DeployServer]]:
    servers: list[DeployServer] = []
    counter = iter(range(1000))

    def make(db: Database | None = None, *, front: bool = False, **deploy: Any) -> DeployServer:
        """A deploy server on the test's proxy; ``front``: the proxy serves its pages too (its
        default target), as the suite's does."""
        workdir = tmp_path / f"deploy{next(counter)}"
        workdir.mkdir()
        server = DeployServer(workdir, db or database, proxy, **deploy)
        if front:
            proxy.stop()
            proxy.front(server.url)
            proxy.start()
        # each test its own database name, so records never leak between tests
        server.config.write_text(
            server.config.read_text().replace(
                "[proxy]", f'database = "t{abs(hash(str(tmp_path))) % 10**12}"\n[proxy]', 1
            )
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
        server.remove_apps()


@pytest.fixture
def deploy(deploy_factory: Callable[..., DeployServer]) -> DeployServer:
    return deploy_factory().start()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    script = ROOT / "scripts" / "kube-testenv"
    was_running = subprocess.run([str(script), "status"], capture_output=True).returncode == 0
    result = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        pytest.fail(
            f"the Kubernetes test control plane did not start (scripts/kube-testenv start):\n"
            f"{result.stderr[-3000:]}"
        )
    kubeconfig = result.stdout.strip().splitlines()[-1].removeprefix("KUBECONFIG=")
    api_client = config.new_client_from_config(config_file=kubeconfig)
    yield kubeconfig, api_client
    api_client.close()
    if not was_running:
        subprocess.run([str(script), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def namespace(kube: tuple[str, Any]) -> Iterator[str]:
    core = client.CoreV1Api(kube[1])
    name = f"binder-test-{secrets.token_hex(4)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=60,
        what="the namespace's default service account",
        ignore=(ApiException,),
    )
    yield name
    core.delete_namespace(name)
