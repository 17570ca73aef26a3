"""What the operator console shows, read through the deployer's public methods only.

Every read of deployment records goes through :meth:`ConsoleData.records`, the one place to
re-point at a paged store query; it keeps the last answer for a couple of seconds so that paging,
sorting and filtering a few thousand records does not ask the database each time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.models import Deployment, Status, iso
from services.deploy_kubernetes.service import Service

CACHE_SECONDS = 2.0
MAX_PAGE = 500
RECENT_FAILURES = 20
SORTS = {
    "created": lambda d: d.created,
    "status": lambda d: (d.status.value, d.created),
    "template": lambda d: (d.template, d.created),
    "last-activity": lambda d: (d.last_activity or d.created, d.created),
    "id": lambda d: d.id,
}
LATENCY_METRIC = "binder_launch_latency_seconds"


@dataclass(frozen=True)
class PageQuery:
    """One page of the deployments table: filters, order and window."""

    status: Status | None = None
    template: str | None = None
    text: str = ""
    sort: str = "created"
    descending: bool = True
    offset: int = 0
    limit: int = 50

    @classmethod
    def parse(cls, params: dict[str, str]) -> PageQuery:
        status = params.get("status") or None
        if status is not None and status not in {s.value for s in Status}:
            raise MalformedRequestError("status: must be deploying, deployed, failed or deleted")
        sort = params.get("sort", "created")
        if sort not in SORTS:
            raise MalformedRequestError(f"sort: must be one of {', '.join(SORTS)}")
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise MalformedRequestError("order: must be asc or desc")
        return cls(
            status=Status(status) if status else None,
            template=params.get("template") or None,
            text=params.get("q", "").strip().lower()[:100],
            sort=sort,
            descending=order == "desc",
            offset=_int(params, "offset", 0, 10**9),
            limit=_int(params, "limit", 50, MAX_PAGE, low=1),
        )


def _int(params: dict[str, str], key: str, default: int, high: int, *, low: int = 0) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise MalformedRequestError(f"{key}: must be an integer from {low} to {high}")
    return int(raw)


def row(dep: Deployment) -> dict[str, Any]:
    return {
        "id": dep.id,
        "template": dep.template,
        "status": dep.status.value,
        "created": iso(dep.created),
        "last-activity": iso(dep.last_activity),
        "ended": iso(dep.ended_at),
        "reason": dep.reason or "",
        "url": dep.url or "",
    }


@dataclass
class ConsoleData:
    service: Service
    limits: dict[str, int | None]
    """Per-client limits from the settings; empty when this server has none."""
    _cached: tuple[float, list[Deployment]] | None = field(default=None, repr=False)

    async def records(self) -> list[Deployment]:
        """Every deployment record handed to users (pooled instances apart)."""
        if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_SECONDS:
            return self._cached[1]
        found = await self.service.records.find()
        self._cached = (time.monotonic(), found)
        return found

    def forget(self) -> None:
        """Drop the cached records (after a change made from the console)."""
        self._cached = None

    async def page(self, query: PageQuery) -> dict[str, Any]:
        records = await self.records()
        counts = {s.value: 0 for s in Status}
        for dep in records:
            counts[dep.status.value] += 1
        chosen = [
            d
            for d in records
            if (query.status is None or d.status is query.status)
            and (query.template is None or d.template == query.template)
            and (not query.text or query.text in f"{d.id} {d.reason or ''}".lower())
        ]
        chosen.sort(key=SORTS[query.sort], reverse=query.descending)
        window = chosen[query.offset : query.offset + query.limit]
        return {
            "now": iso(datetime.now(UTC)),
            "total": len(chosen),
            "counts": counts,
            "offset": query.offset,
            "rows": [row(d) for d in window],
        }

    async def overview(self) -> dict[str, Any]:
        service = self.service
        records = await self.records()
        active = [r for r in records if not r.status.final]
        failed = [r for r in records if r.status is Status.FAILED]
        failed.sort(key=lambda r: r.ended_at or r.created, reverse=True)
        templates = []
        for template in sorted(service.catalog.all(), key=lambda t: t.name):
            info = template.to_api()
            info.pop("env", None)  # values may be secrets; the console shows names only
            info["env-names"] = sorted(template.env)
            info["active"] = sum(1 for r in active if r.template == template.name)
            info["pool"] = await service.pools.state(template.name)
            templates.append(info)
        return {
            "now": iso(datetime.now(UTC)),
            "capacity": {
                "max-deployments": service.records.max_deployments,
                "active": service.records.active_count(),
                "deploying": sum(1 for r in active if r.status is Status.DEPLOYING),
                "deployed": sum(1 for r in active if r.status is Status.DEPLOYED),
            },
            "per-client": self.limits,
            "per-client-in-use": service.client_limits.held(),
            "templates": templates,
            "recent-failures": [row(r) for r in failed[:RECENT_FAILURES]],
            "latency": self.latency(),
        }

    def latency(self) -> dict[str, Any]:
        """The launch-latency histogram of /metrics: cumulative counts per bucket, by pooled."""
        out: dict[str, Any] = {}
        for family in self.service.metrics.registry.collect():
            if family.name != LATENCY_METRIC:
                continue
            for sample in family.samples:
                series = out.setdefault(
                    sample.labels.get("pooled", ""), {"buckets": [], "count": 0, "sum": 0.0}
                )
                if sample.name.endswith("_bucket"):
                    series["buckets"].append([sample.labels["le"], int(sample.value)])
                elif sample.name.endswith("_count"):
                    series["count"] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    series["sum"] = sample.value
        return out
