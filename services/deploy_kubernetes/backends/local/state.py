"""What the local backend keeps of its apps on disk, so that a restarted server finds them again.

A pid file per deployment (``<state_dir>/<id>.json``: pid, port, process start time, template) is
written right after the spawn; a reused pid is told apart by its start time. Every app's
environment carries the suite's label (:func:`suite_label`) and its deployment id, so that an app
whose pid file was never written is found too (:mod:`.discovery`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from common.processes import start_time
from services.deploy_kubernetes.backends.local.folders import checked_id
from services.deploy_kubernetes.models import is_id


def suite_label(state_dir: Path) -> str:
    """The label (``BINDER_SUITE``) in the environment of every app of the suite whose local
    backend keeps its state in ``state_dir``."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]


def still_running(ref: dict[str, Any]) -> bool:
    """Whether the process a pid file names still runs (the same process: its start time)."""
    pid, started = ref.get("pid"), ref.get("started")
    return isinstance(pid, int) and started is not None and start_time(pid) == started


class PidFiles:
    """The pid files in ``folder``, one per deployment id."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, dep_id: str) -> Path:
        return self.folder / f"{checked_id(dep_id)}.json"

    def write(self, dep_id: str, ref: dict[str, Any]) -> None:
        """Write the pid file in the state folder, through no link (``O_NOFOLLOW``)."""
        path = self.path(dep_id)
        tmp = path.with_suffix(".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(ref))
        tmp.replace(path)

    def read(self, dep_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(dep_id).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remove(self, dep_id: str) -> None:
        self.path(dep_id).unlink(missing_ok=True)

    def ids(self) -> list[str]:
        """The deployment ids that have a pid file, sorted."""
        return [p.stem for p in sorted(self.folder.glob("*.json")) if is_id(p.stem)]
