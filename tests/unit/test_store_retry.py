"""The store's one retry: an operation whose connection broke (the database restarted) runs once
more; one out of time, or a second break, is a ``BadDatabaseError`` (503), never a raw error of
the driver."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest
from pymongo.errors import AutoReconnect, DuplicateKeyError, NetworkTimeout

from services.deploy_kubernetes.errors import BadDatabaseError, ConflictError
from services.deploy_kubernetes.store.mongo import _translated


def _failing(*errors: Exception) -> tuple[list[int], Callable[[], Coroutine[Any, Any, int]]]:
    """An operation that raises ``errors`` in turn, then answers 42; and its calls."""
    calls: list[int] = []

    @_translated
    async def operation() -> int:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return 42

    return calls, operation


def test_a_broken_connection_is_tried_once_more() -> None:
    calls, operation = _failing(AutoReconnect("connection reset"))
    assert anyio.run(operation) == 42
    assert len(calls) == 2


def test_a_second_break_is_a_bad_database() -> None:
    calls, operation = _failing(AutoReconnect("reset"), AutoReconnect("reset again"))
    with pytest.raises(BadDatabaseError, match="AutoReconnect"):
        anyio.run(operation)
    assert len(calls) == 2


def test_out_of_time_is_not_tried_again() -> None:
    calls, operation = _failing(NetworkTimeout("timed out"))
    with pytest.raises(BadDatabaseError, match="NetworkTimeout"):
        anyio.run(operation)
    assert len(calls) == 1


def test_a_duplicate_is_a_conflict() -> None:
    _, operation = _failing(DuplicateKeyError("E11000"))
    with pytest.raises(ConflictError):
        anyio.run(operation)
