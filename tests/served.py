"""The deploy server's app over the fakes of its ports, served in-process for unit tests of the
logic above the ports (``tests/unit``): one way to make it and to wait for a launch's end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fakes import FakeBackend, FakeProxy, FakeStore, FakeWindows
from harness import wait_for
from starlette.testclient import TestClient

from common.settings import load_settings
from services.deploy_kubernetes.app import create_app

Parts = tuple[FakeStore, FakeBackend, FakeProxy]


def fake_parts() -> Parts:
    return FakeStore(), FakeBackend(), FakeProxy()


@contextmanager
def served(
    parts: Parts,
    *,
    home: Path,
    environ: dict[str, str],
    keeper_interval: float = 0.05,
    ready_within: float = 5,
) -> Iterator[TestClient]:
    """The app on ``parts`` with the settings of ``environ``, once its /health answers 200
    (within ``ready_within`` seconds)."""
    store, backend, proxy = parts
    app = create_app(
        load_settings(home=home, environ=environ),
        backend=backend,
        store=store,
        windows=FakeWindows(),
        proxy=proxy,
        keeper_interval=keeper_interval,
    )
    with TestClient(app) as client:
        wait_for(
            lambda: client.get("/health").status_code == 200, timeout=ready_within, what="ready"
        )
        yield client


def ended_launch(client: TestClient, dep_id: str, template: str = "example") -> dict[str, object]:
    """The record of a launch once it is no longer ``deploying``."""

    def check() -> dict[str, object] | None:
        data: dict[str, object] = client.get(f"/applications/{template}/{dep_id}").json()
        return data if data["status"] != "deploying" else None

    result: dict[str, object] = wait_for(check, timeout=5, what="the launch to end")
    return result
