"""Each app's share of the log aggregator: lines over it are dropped, and one record says how
many."""

from __future__ import annotations

from typing import Any

from services.logging.quota import AppQuota


def _lines(n: int, text: str = "x") -> list[dict[str, Any]]:
    return [{"_id": f"1:{i}", "service": "app", "message": text, "time": i} for i in range(n)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_over_the_share_are_dropped_and_counted_once() -> None:
    clock = Clock()
    quota = AppQuota(lines_per_second=10, bytes_per_second=10_000, clock=clock)
    out = quota.admit("a" * 32, _lines(25))
    assert [r["message"] for r in out[:10]] == ["x"] * 10
    assert len(out) == 11
    assert out[10]["level"] == "warning"
    assert out[10]["message"].startswith("[binder: 15 lines of this app's output dropped")
    assert (out[10]["id"], out[10]["_id"], out[10]["service"]) == ("a" * 32, "1:10:dropped", "app")
    assert quota.dropped == 15
    # another app has a share of its own
    assert len(quota.admit("b" * 32, _lines(10))) == 10
    # half a second later, half a second's worth
    clock.now += 0.5
    assert len([r for r in quota.admit("a" * 32, _lines(10)) if r["message"] == "x"]) == 5
    # a quiet app's bucket fills to one second's worth, no more
    clock.now += 60
    assert len(quota.admit("a" * 32, _lines(30))) == 11


def test_bytes_count_too() -> None:
    quota = AppQuota(lines_per_second=1000, bytes_per_second=100, clock=Clock())
    out = quota.admit("a" * 32, _lines(10, "y" * 39))  # 40 bytes a line with its end
    assert [r["message"] for r in out[:2]] == ["y" * 39] * 2
    assert "8 lines" in out[2]["message"]
