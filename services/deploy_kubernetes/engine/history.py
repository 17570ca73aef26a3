"""History retention, by the leader: ended records are kept ``history_days``, then removed.

The counts in ``/metrics`` are counters of what happened, not reads of the records: removing
records changes none of them."""

from __future__ import annotations

from datetime import timedelta

from loguru import logger

from common.background import repeat
from services.deploy_kubernetes.engine.records import Records
from services.deploy_kubernetes.models import now

CHECK_EVERY_SECONDS = 600.0


class History:
    def __init__(
        self, *, records: Records, days: float, every: float = CHECK_EVERY_SECONDS
    ) -> None:
        self._records = records
        self.days = days
        self.every = every

    async def remove_once(self) -> int:
        removed = await self._records.remove_ended(now() - timedelta(days=self.days))
        if removed:
            logger.info("removed {} records that ended over {:g} days ago", removed, self.days)
        return removed

    async def run(self) -> None:
        await repeat(self.remove_once, every=self.every, what="history retention")
