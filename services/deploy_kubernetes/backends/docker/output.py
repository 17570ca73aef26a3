"""Each container's output, copied to ``<home>/logs/apps/<id>.log``, which the log aggregator
follows (as it does the local backend's apps): their lines reach it as the app's records.

A thread per running container reads the engine's stream of the container's output (stdout and
stderr, as the Docker SDK hands it over) and appends it to the file; the stream ends when the
container does. Each container of the suite is followed from its start (its ``start`` event);
those already running when the server starts are followed again from the moment their file was
last written, so a server restart repeats no line (the engine's ``since``). A file is bounded:
past ``MAX_BYTES`` it becomes ``<id>.log.1`` (which the aggregator reads to its end, as a rotated
file) and a new one begins; older output is dropped.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import docker.errors
import requests.exceptions
from loguru import logger

from services.deploy_kubernetes.models import ID_RE

MAX_BYTES = 10 * 1024 * 1024


class OutputCopier:
    """Copies the output of the suite's containers into ``folder``, one thread each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._copying: set[str] = set()
        self._lock = threading.Lock()

    def copying(self) -> set[str]:
        with self._lock:
            return set(self._copying)

    def follow(self, container: Any, dep_id: str) -> None:
        """Copy ``container``'s output from now on (from where its file ends, when it has one),
        unless it is copied already."""
        if not ID_RE.match(dep_id):
            return  # a label that names no deployment is never made into a path
        with self._lock:
            if dep_id in self._copying:
                return
            self._copying.add(dep_id)
        threading.Thread(
            target=self._copy, args=(container, dep_id), name=f"output-{dep_id[:8]}", daemon=True
        ).start()

    def _copy(self, container: Any, dep_id: str) -> None:
        path = self.folder / f"{dep_id}.log"
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            since = path.stat().st_mtime if path.exists() else None
            chunks = container.logs(stream=True, follow=True, stdout=True, stderr=True, since=since)
            out = _open(path)
            try:
                for chunk in chunks:
                    os.write(out, chunk)
                    if os.fstat(out).st_size > MAX_BYTES:
                        os.close(out)
                        os.replace(path, path.with_name(path.name + ".1"))
                        out = _open(path)
            finally:
                os.close(out)
        except (
            docker.errors.DockerException,
            requests.exceptions.RequestException,
            OSError,
        ) as exc:
            logger.bind(id=dep_id).debug("output copy of the container ended: {}", exc)
        finally:
            with self._lock:
                self._copying.discard(dep_id)


def _open(path: Path) -> int:
    """``path`` for appending, never through a link (the folder is the suite's own)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)
    return fd
