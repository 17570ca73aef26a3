""":class:`MongoWindows`: per-client launch windows shared by every server, on the ``limits``
library's MongoDB storage (its moving window: one conditional upsert per hit, refused by the
unique ``_id`` when the window is full, so two servers hitting one key at once stay exact; shown
on the embedded server: 50 hits from two clients against 30 a minute admit exactly 30).

The library's async storage speaks through ``motor``, a client of its own beside the store's. Its
sliding-window-counter strategy is not used: it compares dates with ``$$NOW`` in an aggregation,
which the embedded server gets wrong.
"""

from __future__ import annotations

import time

from limits import RateLimitItemPerMinute
from limits.aio.storage import MongoDBStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from services.deploy_kubernetes.errors import BadDatabaseError


class MongoWindows:
    """At most ``per_minute`` events of each key in any 60 seconds, counted in the database."""

    def __init__(self, *, uri: str, database: str, per_minute: int, timeout_ms: int = 2000) -> None:
        self._storage = MongoDBStorage(
            "async+" + uri,
            database_name=database,
            window_collection_name="launch_windows",
            counter_collection_name="launch_counters",
            wrap_exceptions=True,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=2 * timeout_ms,
            tz_aware=True,
        )
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._item = RateLimitItemPerMinute(per_minute)

    async def hit(self, key: str) -> float:
        try:
            if await self._limiter.hit(self._item, key):
                return 0.0
            stats = await self._limiter.get_window_stats(self._item, key)
        except StorageError as exc:
            raise BadDatabaseError(f"database unreachable: {exc.__class__.__name__}") from exc
        return max(0.001, stats.reset_time - time.time())

    def close(self) -> None:
        self._storage.storage.close()
