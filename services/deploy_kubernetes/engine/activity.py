"""Activity an app tells of itself, beside the proxy's: where its template names an
``activity-path``, the app answers there with JSON carrying its ``last_activity`` (an ISO time),
as Jupyter's ``api/status`` does and as jupyterhub-idle-culler reads it.

Why: the proxy sees only the bytes that pass through it, so a kernel computing with no browser
attached, or a tab that only listens to output, looks idle to it. Jupyter's own ``last_activity``
counts kernel messages too, but not a cell that computes in silence: where the activity path is
Jupyter's ``api/status``, its sibling ``api/kernels`` is read as well, and a kernel whose
``execution_state`` is ``busy`` is activity now. Both are read with the launch's token, and with
``no_track_activity`` where Jupyter honours it, so that reading them is not activity itself.

Exit condition: none while the proxy's count is the only other measure; drop the kernels' read
if Jupyter's ``last_activity`` comes to count busy kernels itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from loguru import logger

from common.local_http import RequestError, request
from common.proxy import PROBE_AGENT
from services.deploy_kubernetes.models import Deployment, Template, now

READ_SECONDS = 2.0
JUPYTER_STATUS = "api/status"


def _stamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def busy(kernels: Any) -> bool:
    """Whether Jupyter's ``api/kernels`` answer lists a kernel that is computing."""
    return isinstance(kernels, list) and any(
        isinstance(k, dict) and k.get("execution_state") == "busy" for k in kernels
    )


class AppActivity:
    """Reads each app's own ``last_activity`` at its target (from this host, as readiness does)."""

    async def last_activity(self, dep: Deployment, template: Template) -> datetime | None:
        """When ``dep``'s app last saw activity by its own account; None where its template
        names no ``activity-path`` or the app does not tell (it is then judged by the proxy's
        count alone)."""
        if not template.activity_path or not dep.target or not dep.target.startswith("http://"):
            return None
        base = f"{dep.target}{dep.route}/"
        status = await self._read(dep, base + template.activity_path)
        last = _stamp(status.get("last_activity")) if isinstance(status, dict) else None
        if template.activity_path.rstrip("/").endswith(JUPYTER_STATUS):
            kernels_path = template.activity_path.rstrip("/")[: -len("status")] + "kernels"
            if busy(await self._read(dep, f"{base}{kernels_path}?no_track_activity=1")):
                return now()
        return last

    async def _read(self, dep: Deployment, url: str) -> Any:
        headers = {"User-Agent": PROBE_AGENT, "Accept": "application/json"}
        if dep.token:
            headers["Authorization"] = f"token {dep.token}"
        try:
            answer = await request(url, headers=headers, seconds=READ_SECONDS)
            return answer.json() if answer.status == 200 else None
        except (RequestError, ValueError) as exc:
            logger.bind(id=dep.id).debug("no activity read from the app: {}", exc)
            return None
