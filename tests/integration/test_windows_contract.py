"""One suite over both implementations of the per-client launch windows: the ``limits`` library's
moving window on the real database server (:class:`MongoWindows`), and the fake the unit tests
use, so the two cannot drift apart."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import anyio
import pytest
from fakes import FakeWindows
from harness import Database

from services.deploy_kubernetes.store.windows import MongoWindows

pytestmark = pytest.mark.integration


def _mongo(database: Database, amount: int, name: str) -> MongoWindows:
    return MongoWindows(uri=database.uri, database=name, per_minute=amount)


def _fake(database: Database, amount: int, name: str) -> FakeWindows:
    return FakeWindows(amount=amount)


@pytest.mark.parametrize("make", [_mongo, _fake], ids=["mongo", "fake"])
def test_a_full_window_refuses_and_says_how_long_until_it_has_room(
    make: Callable[..., MongoWindows | FakeWindows], database: Database
) -> None:
    windows = make(database, 3, f"windows{secrets.token_hex(4)}")

    async def main() -> tuple[list[float], float]:
        admitted = [await windows.hit("10.0.0.1") for _ in range(3)]
        return [*admitted, await windows.hit("10.0.0.2")], await windows.hit("10.0.0.1")

    try:
        admitted, refused = anyio.run(main)
    finally:
        if isinstance(windows, MongoWindows):
            windows.close()
    assert admitted == [0.0, 0.0, 0.0, 0.0]  # three of one client, and another client's first
    assert 0 < refused <= 60  # the fourth of the first client: the wait until its oldest leaves
