"""Each app's share of the aggregator: the lines of ``logs/apps/<id>.log`` stored per second are
bounded per app (lines and bytes), so that an app printing as fast as it can (100 MB in 0.3 s
was measured) neither fills the database nor takes the aggregator from the others.

A token bucket per app, holding one second's worth: what is over it is dropped, not stored, and
one record in its place says how many lines were dropped. The file keeps them (bounded by its
shim) and the tailer's offset moves past them: they are not read again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FORGET_SECONDS = 60.0
"""An app whose bucket has been full this long is forgotten (its bucket would be full again)."""


@dataclass
class _Bucket:
    lines: float
    bytes: float
    at: float


@dataclass
class AppQuota:
    """At most ``lines_per_second`` lines and ``bytes_per_second`` bytes of each app's output a
    second, with bursts of one second's worth."""

    lines_per_second: int
    bytes_per_second: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    dropped: int = 0
    """Lines dropped so far (for /metrics)."""

    def admit(self, dep_id: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records of ``dep_id``'s output that fit its share now, followed by one record
        saying how many were dropped, if any were."""
        now = self.clock()
        bucket = self._refill(dep_id, now)
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for record in records:
            size = len(str(record.get("message", "")).encode()) + 1
            if not dropped and bucket.lines >= 1 and bucket.bytes >= size:
                bucket.lines -= 1
                bucket.bytes -= size
                kept.append(record)
            else:
                dropped.append(record)
        if dropped:
            self.dropped += len(dropped)
            kept.append(self._notice(dep_id, dropped))
        return kept

    def _refill(self, dep_id: str, now: float) -> _Bucket:
        if len(self._buckets) > 1000:  # forget apps quiet for long: their buckets are full
            self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < FORGET_SECONDS}
        bucket = self._buckets.get(dep_id)
        if bucket is None:
            bucket = self._buckets[dep_id] = _Bucket(
                self.lines_per_second, self.bytes_per_second, now
            )
        elapsed = max(0.0, now - bucket.at)
        bucket.lines = min(self.lines_per_second, bucket.lines + elapsed * self.lines_per_second)
        bucket.bytes = min(self.bytes_per_second, bucket.bytes + elapsed * self.bytes_per_second)
        bucket.at = now
        return bucket

    def _notice(self, dep_id: str, dropped: list[dict[str, Any]]) -> dict[str, Any]:
        first = dropped[0]
        return {
            **{k: v for k, v in first.items() if k in ("time", "service", "stream", "file")},
            "_id": f"{first.get('_id', '')}:dropped",
            "id": dep_id,
            "level": "warning",
            "message": (
                f"[binder: {len(dropped)} lines of this app's output dropped: over "
                f"{self.lines_per_second} lines or {self.bytes_per_second} bytes a second]"
            ),
        }
