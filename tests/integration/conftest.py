"""Fixtures starting the real components: the database server (one per session), a proxy and a
deploy server per test."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Database, DeployServer, Proxy


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = Database(tmp_path_factory.mktemp("database")).start()
    yield db
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

    def make(db: Database | None = None, **deploy: Any) -> DeployServer:
        workdir = tmp_path / f"deploy{next(counter)}"
        workdir.mkdir()
        server = DeployServer(workdir, db or database, proxy, **deploy)
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
        for pid in server.app_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def deploy(deploy_factory: Callable[..., DeployServer]) -> DeployServer:
    return deploy_factory().start()
