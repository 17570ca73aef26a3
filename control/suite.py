"""The supervised suite on one host: prepare its home, start it in order, stop it, report on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import BinderError, ConfigError
from common.settings import Settings, dump_toml
from control.secrets import (
    choose_api_key,
    ensure_home,
    ensure_secrets,
    read_secrets,
    write_private,
)
from control.services import ORDER, Service, declare, embedded_db, is_ready, port_in_use
from control.supervisor_client import ControlError, Supervisor
from control.supervisord import render

READY_TIMEOUT = 60.0
STATES = {
    0: "STOPPED",
    10: "STARTING",
    20: "RUNNING",
    30: "BACKOFF",
    40: "STOPPING",
    100: "EXITED",
    200: "FATAL",
    1000: "UNKNOWN",
}


@dataclass(frozen=True)
class Row:
    """One service's line in ``status``."""

    name: str
    state: str
    pid: int | None
    uptime: float | None
    ready: bool
    restarts: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.name,
            "state": self.state,
            "pid": self.pid,
            "uptime_seconds": None if self.uptime is None else round(self.uptime, 1),
            "ready": self.ready,
            "restarts": self.restarts,
        }


class Suite:
    """The suite of one home. Constructing it writes nothing; :meth:`prepare` writes the home's
    files (and is called only by the commands that start or restart services)."""

    def __init__(self, settings: Settings, *, api_key: str | None = None) -> None:
        self.settings = settings
        self.home = settings.home
        self.api_key = api_key
        """The key to start with; None means the stored one (or a new one at the first start)."""
        self.supervisor = Supervisor(self.home)
        self.effective_config = self.home / "effective.toml"
        self.services = declare(settings, self.effective_config)
        self._secrets: dict[str, str] = {}

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        if name == "db" and self.settings.db.uri:
            raise ConfigError(
                "db.uri points at an external MongoDB: the suite runs no `db` program"
            )
        raise ConfigError(f"no service named {name!r} (services: {', '.join(ORDER)})")

    # --- files --------------------------------------------------------------------------------

    def prepare(self) -> set[str]:
        """Write the home's files (secrets, effective config, supervisord.conf).

        Returns the names of the secrets whose values changed since the last time.
        """
        ensure_home(self.home)
        before = read_secrets(self.home)
        self.api_key = self.api_key or choose_api_key(self.home, None, {})
        self._secrets = ensure_secrets(
            self.home,
            settings=self.settings,
            api_key=self.api_key,
            embedded_db=embedded_db(self.settings),
        )
        write_private(self.effective_config, dump_toml(self.settings))
        write_private(self.supervisor.conf, self.render())
        return {k for k, v in self._secrets.items() if before.get(k) != v}

    def secrets(self) -> dict[str, str]:
        """The secrets the services run with (read from the home; never written here)."""
        if not self._secrets:
            self._secrets = read_secrets(self.home)
        return self._secrets

    def restart_if_secrets_changed(self, changed: set[str], names: list[str]) -> None:
        """Stop those of ``names`` that run with an old value of a secret, so they start anew."""
        for service in self.services:
            info = self.supervisor.info(service.name)
            running = info is not None and info["statename"] in ("RUNNING", "STARTING", "BACKOFF")
            if service.name in names and running and changed & set(service.secrets):
                self.supervisor.stop(service.name)

    def render(self) -> str:
        return render(home=self.home, python=sys.executable, services=self.services)

    # --- starting -----------------------------------------------------------------------------

    def ensure_supervisord(self) -> None:
        if self.supervisor.running():
            self.supervisor.update()
            return
        self.check_ports(self.services)
        self.supervisor.start_daemon()

    def check_ports(self, services: list[Service]) -> None:
        for service in services:
            info = self.supervisor.info(service.name)
            if info is not None and info["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
                continue
            for address, port in service.ports:
                if port_in_use(address, port):
                    raise ConfigError(
                        f"port {port} of service {service.name} ({address}:{port}) is in use "
                        "by another program; stop it or change the port in the config"
                    )

    def start(
        self, name: str, *, on_wait: Callable[[str], None] = lambda _: None, settle: bool = True
    ) -> None:
        """Start one service and wait until it answers (and, with ``settle``, until supervisord
        counts it RUNNING: ``startsecs`` after its start)."""
        service = self.service(name)
        info = self.supervisor.info(name)
        if info is None or info["statename"] not in ("RUNNING", "STARTING", "BACKOFF"):
            self.check_ports([service])
            self.supervisor.start(name)
        on_wait(name)
        self.await_ready(service)
        if settle:
            self.await_settled([service])

    def await_settled(self, services: list[Service], timeout: float = 10.0) -> None:
        """Wait until supervisord counts every one of ``services`` RUNNING. A service answers
        before that (it is started in the meantime, so the next one need not wait for it)."""
        deadline = time.monotonic() + timeout
        for service in services:
            while (self.supervisor.info(service.name) or {}).get("statename") == "STARTING":
                if time.monotonic() > deadline:
                    raise ControlError(
                        f"service {service.name} is still STARTING after {timeout:g} s"
                    )
                time.sleep(0.05)
            state = (self.supervisor.info(service.name) or {}).get("statename")
            if state != "RUNNING":
                self.await_ready(service)  # says why, with its stderr

    def await_ready(self, service: Service, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        interval = 0.02
        while True:
            info = self.supervisor.info(service.name) or {}
            state = info.get("statename", "UNKNOWN")
            if state in ("STARTING", "RUNNING") and is_ready(service, self.secrets()):
                return
            if state in ("FATAL", "EXITED", "STOPPED") or time.monotonic() > deadline:
                why = "gave up starting" if state == "FATAL" else f"is {state}"
                if state not in ("FATAL", "EXITED", "STOPPED"):
                    why = f"was not ready within {timeout:g} s (state {state})"
                tail = self.supervisor.stderr_tail(service.name).strip().splitlines()[-15:]
                detail = "\n".join(f"  | {line}" for line in tail) or "  | (no output on stderr)"
                raise ControlError(
                    f"service {service.name} {why}; last lines of its stderr:\n{detail}"
                )
            time.sleep(interval)
            interval = min(interval * 1.5, 0.25)

    def start_all(self, *, on_wait: Callable[[str], None] = lambda _: None) -> None:
        """Start everything in order. When a service fails, what this call started is stopped
        again (supervisord too, if it started it) before the error is raised."""
        changed = self.prepare()
        daemon_was_running = self.supervisor.running()
        self.ensure_supervisord()
        self.restart_if_secrets_changed(changed, [s.name for s in self.services])
        before = {s.name: self._active(s.name) for s in self.services}
        try:
            for service in self.services:
                self.start(service.name, on_wait=on_wait, settle=False)
            self.await_settled(self.services)
        except BinderError:
            self._undo([s.name for s in self.services if not before[s.name]], daemon_was_running)
            raise

    def _active(self, name: str) -> bool:
        info = self.supervisor.info(name)
        return info is not None and info["statename"] in ("RUNNING", "STARTING", "BACKOFF")

    def _undo(self, started: list[str], daemon_was_running: bool) -> None:
        """Stop ``started`` (newest first) and supervisord when it was not running before."""
        for name in reversed(started):
            self.supervisor.stop(name)
        if not daemon_was_running:
            self.supervisor.shutdown()

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, name: str) -> None:
        self.service(name)
        if not self.supervisor.running():
            return
        self.supervisor.stop(name)
        if name == "deploy-kubernetes":
            self._finish(self._stop_apps())

    def _stop_apps(self) -> subprocess.Popen[str] | None:
        """End the deploy server's apps on this host (local processes, containers)."""
        if self.settings.deploy.backend == "kubernetes":
            return None
        deploy = self.service("deploy-kubernetes")
        secrets = self.secrets()
        return subprocess.Popen(
            [*deploy.command, "--stop-apps"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "BINDER_HOME": str(self.home),
                **{k: secrets[k] for k in deploy.secrets if k in secrets},
            },
        )

    def _finish(self, proc: subprocess.Popen[str] | None) -> None:
        if proc is None:
            return
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise ControlError(f"stopping the deployed apps failed: {stderr.strip()[-2000:]}")

    def stop_all(self, *, on_wait: Callable[[str], None] = lambda _: None) -> None:
        if not self.supervisor.running():
            return
        cleanup = None
        for service in reversed(self.services):
            on_wait(service.name)
            if service.name == "db":
                self._finish(cleanup)  # the apps' records are written before the database stops
                cleanup = None
            self.supervisor.stop(service.name)
            if service.name == "deploy-kubernetes":
                cleanup = self._stop_apps()
        self._finish(cleanup)
        self.supervisor.shutdown()
        for service in self.services:
            for address, port in service.ports:
                deadline = time.monotonic() + 5
                while port_in_use(address, port) and time.monotonic() < deadline:
                    time.sleep(0.02)

    def restart(self, name: str, *, on_wait: Callable[[str], None] = lambda _: None) -> None:
        """Restart one service of a running suite, with the home's files written anew."""
        self.service(name)
        if not self.supervisor.running():
            raise ControlError(
                f"cannot restart {name}: the suite is not running (start it with start-all)"
            )
        self.prepare()
        self.supervisor.stop(name)
        self.start(name, on_wait=on_wait)

    # --- reporting ----------------------------------------------------------------------------

    def status(self) -> list[Row]:
        restarts = self.restart_counts()
        rows = []
        running = self.supervisor.running()
        for service in self.services:
            info = self.supervisor.info(service.name) if running else None
            state = info["statename"] if info else "STOPPED"
            pid = info["pid"] or None if info else None
            uptime = (info["now"] - info["start"]) if info and state == "RUNNING" else None
            ready = state == "RUNNING" and is_ready(service, self.secrets())
            rows.append(Row(service.name, state, pid, uptime, ready, restarts.get(service.name, 0)))
        return rows

    def restart_counts(self) -> dict[str, int]:
        """Unexpected exits that supervisord restarted, since it last started (from its log)."""
        log = self.home / "logs" / "supervisord.log"
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        counts: dict[str, int] = {}
        pattern = re.compile(r"exited: (\S+) \(.*not expected\)")
        for line in lines:
            if "supervisord started with pid" in line:
                counts = {}
            match = pattern.search(line)
            if match:
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
        return counts
