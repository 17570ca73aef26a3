"""What the operator console shows, read through the deployer's use-case methods only.

The deployments table is paged, filtered and sorted by the database (:meth:`Deployer.search`):
months of history are never read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.deploy_kubernetes.engine.deployer import Deployer
from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.models import Deployment, Status, iso
from services.deploy_kubernetes.store.base import SEARCH_SORTS, Search

MAX_PAGE = 500
RECENT_FAILURES = 20


def page_query(params: dict[str, str]) -> Search:
    """The store's query for one page of the deployments table, from the console's parameters
    (``status``, ``template``, ``q``, ``sort``, ``order``, ``offset``, ``limit``)."""
    status = params.get("status") or None
    if status is not None and status not in {s.value for s in Status}:
        raise MalformedRequestError("status: must be deploying, deployed, failed or deleted")
    sort = params.get("sort", "created")
    if sort not in SEARCH_SORTS:
        raise MalformedRequestError(f"sort: must be one of {', '.join(SEARCH_SORTS)}")
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise MalformedRequestError("order: must be asc or desc")
    return Search(
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
    deployer: Deployer
    limits: dict[str, int | None]
    """Per-client limits from the settings; empty when this server has none."""

    def forget(self) -> None:
        """Nothing is kept between requests (kept for the console's routes)."""

    async def page(self, query: Search) -> dict[str, Any]:
        rows, total = await self.deployer.search(query)
        return {
            "now": iso(datetime.now(UTC)),
            "total": total,
            "counts": await self.deployer.status_counts(),
            "offset": query.offset,
            "rows": [row(d) for d in rows],
        }

    async def overview(self) -> dict[str, Any]:
        deployer = self.deployer
        counts = await deployer.status_counts()
        capacity = await deployer.capacity()
        failed, _ = await deployer.search(
            Search(status=Status.FAILED, sort="created", limit=RECENT_FAILURES)
        )
        templates = []
        for template in sorted(deployer.templates(), key=lambda t: t.name):
            info = template.to_api()
            info.pop("env", None)  # values may be secrets; the console shows names only
            info["env-names"] = sorted(template.env)
            info["pool"] = await deployer.pool(template.name)
            pooled = int(info["pool"]["ready"]) + int(info["pool"]["starting"])
            info["active"] = capacity["per-template"].get(template.name, 0) - pooled
            templates.append(info)
        return {
            "now": iso(datetime.now(UTC)),
            "capacity": {
                "max-deployments": capacity["max-deployments"],
                "active": capacity["active"],
                "deploying": counts[Status.DEPLOYING.value],
                "deployed": counts[Status.DEPLOYED.value],
            },
            "per-client": self.limits,
            "per-client-in-use": deployer.clients_in_use(),
            "templates": templates,
            "recent-failures": [row(r) for r in failed],
            "latency": deployer.launch_latency(),
        }
