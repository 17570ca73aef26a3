"""Finding the suite's apps that run without a pid file (the server died between an app's spawn
and its pid file), by the label in their environment, in ``/proc``.

What is read here is the app's to write (its environment): every value is checked, and one that is
not of its form (an id of 32 hex digits, a port, a template name) or a process of another user
than the apps' disqualifies the process.
"""

from __future__ import annotations

import os
from typing import Any

from common.processes import session_leaders_with, start_time
from services.deploy_kubernetes.backends.base import Observed, State
from services.deploy_kubernetes.models import NAME_RE, is_id


def unrecorded(suite: str, recorded: set[str], *, host: str, uid: int) -> list[Observed]:
    """Apps of the suite labelled ``suite`` whose ids are not in ``recorded``, running as ``uid``
    (the apps' user), as the backend's observations, their targets on ``host``."""
    out = []
    for pid, env in session_leaders_with("BINDER_SUITE", suite).items():
        dep_id = env.get("BINDER_ID", "")
        if dep_id in recorded or not is_id(dep_id) or not _owned_by(pid, uid):
            continue
        port = env.get("PORT", "")
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            continue
        name = env.get("BINDER_TEMPLATE", "")
        template = name if NAME_RE.match(name) else None
        ref: dict[str, Any] = {"pid": pid, "port": int(port)}
        ref |= {"started": start_time(pid), "template": template}
        target = f"http://{host}:{ref['port']}"
        out.append(
            Observed(id=dep_id, state=State.RUNNING, target=target, ref=ref, template=template)
        )
    return out


def _owned_by(pid: int, uid: int) -> bool:
    """True when process ``pid`` runs as ``uid`` (not as root or the server's user)."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return owner == uid
