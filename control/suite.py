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
from control.launch import free, holders
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
STOP_HOOK_TIMEOUT = 120.0
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
        declared = declare(settings, self.effective_config)
        self._declared = {service.name: service for service in declared}
        self.services = [service for service in declared if not service.external]
        """The services this host runs, in start order."""
        self._secrets: dict[str, str] = {}

    def service(self, name: str) -> Service:
        """The declaration of a service this host runs (an error saying why it does not)."""
        service = self._declared.get(name)
        if service is None:
            raise ConfigError(f"no service named {name!r} (services: {', '.join(ORDER)})")
        if service.external:
            raise ConfigError(service.external)
        return service

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
            if service.name in names and self._active(service) and changed & set(service.secrets):
                self.supervisor.stop(_all(service))

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
            if self._active(service):  # its own processes hold its ports
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
        if not self._active(service):
            taken = [
                f"{port} ({holders(port)})" for host, port in service.ports if not free(host, port)
            ]
            for process in service.process_names():
                self.supervisor.start(process)  # its launcher waits for its ports, saying so
            if taken:
                raise ControlError(
                    f"service {name} waits for its port {', '.join(taken)} to be free; it "
                    "starts once it is (binder-control status shows when it is ready)"
                )
        for process in service.process_names():
            if not self._running(process):
                self.supervisor.start(process)
        on_wait(name)
        self.await_ready(service)
        if settle:
            self.await_settled([service])

    def await_settled(self, services: list[Service], timeout: float = 10.0) -> None:
        """Wait until supervisord counts every one of ``services`` RUNNING. A service answers
        before that (it is started in the meantime, so the next one need not wait for it)."""
        deadline = time.monotonic() + timeout
        for service in services:
            for process in service.process_names():
                while (self.supervisor.info(process) or {}).get("statename") == "STARTING":
                    if time.monotonic() > deadline:
                        raise ControlError(
                            f"service {process} is still STARTING after {timeout:g} s"
                        )
                    time.sleep(0.05)
                state = (self.supervisor.info(process) or {}).get("statename")
                if state != "RUNNING":
                    self.await_ready(service)  # says why, with its stderr

    def await_ready(self, service: Service, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every process of ``service`` answers ready."""
        for number, process in enumerate(service.process_names()):
            self._await_process(service, process, number, timeout)

    def _await_process(self, service: Service, process: str, number: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        interval = 0.02
        which = number if service.processes > 1 else None
        while True:
            info = self.supervisor.info(process) or {}
            state = info.get("statename", "UNKNOWN")
            if state in ("STARTING", "RUNNING") and is_ready(service, self.secrets(), which):
                return
            if state in ("FATAL", "EXITED", "STOPPED") or time.monotonic() > deadline:
                why = "gave up starting" if state == "FATAL" else f"is {state}"
                if state not in ("FATAL", "EXITED", "STOPPED"):
                    why = f"was not ready within {timeout:g} s (state {state})"
                tail = self.supervisor.stderr_tail(process).strip().splitlines()[-15:]
                detail = "\n".join(f"  | {line}" for line in tail) or "  | (no output on stderr)"
                raise ControlError(f"service {process} {why}; last lines of its stderr:\n{detail}")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.25)

    def start_all(self, *, on_wait: Callable[[str], None] = lambda _: None) -> None:
        """Start everything in order. When a service fails, what this call started is stopped
        again (supervisord too, if it started it) before the error is raised. A start refused
        before anything runs (a port taken) writes nothing to the home."""
        daemon_was_running = self.supervisor.running()
        if not daemon_was_running:
            self.check_ports(self.services)
        changed = self.prepare()
        self.ensure_supervisord()
        self.restart_if_secrets_changed(changed, [s.name for s in self.services])
        before = {s.name: self._active(s) for s in self.services}
        try:
            for service in self.services:
                self.start(service.name, on_wait=on_wait, settle=False)
            self.await_settled(self.services)
        except BinderError:
            self._undo([s.name for s in self.services if not before[s.name]], daemon_was_running)
            raise

    def _running(self, process: str) -> bool:
        info = self.supervisor.info(process)
        return info is not None and info["statename"] in ("RUNNING", "STARTING", "BACKOFF")

    def _active(self, service: Service) -> bool:
        """Whether any process of ``service`` runs (or is starting)."""
        return any(self._running(p) for p in service.process_names())

    def _undo(self, started: list[str], daemon_was_running: bool) -> None:
        """Stop ``started`` (newest first) and supervisord when it was not running before."""
        for name in reversed(started):
            self.supervisor.stop(_all(self.service(name)))
        if not daemon_was_running:
            self.supervisor.shutdown()

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, name: str) -> None:
        service = self.service(name)
        if not self.supervisor.running():
            return
        self.supervisor.stop(_all(service))
        self._finish(service, self._run_stop_hook(service))

    def _run_stop_hook(self, service: Service) -> subprocess.Popen[str] | None:
        """Start the service's stop hook (with its secrets), if it has one."""
        if not service.stop_hook:
            return None
        secrets = self.secrets()
        return subprocess.Popen(
            list(service.stop_hook),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "BINDER_HOME": str(self.home),
                **{k: secrets[k] for k in service.secrets if k in secrets},
            },
        )

    def _finish(self, service: Service, proc: subprocess.Popen[str] | None) -> None:
        if proc is None:
            return
        _, stderr = proc.communicate(timeout=STOP_HOOK_TIMEOUT)
        if proc.returncode != 0:
            raise ControlError(
                f"what runs after {service.name} stops failed: {stderr.strip()[-2000:]}"
            )

    def stop_all(self, *, on_wait: Callable[[str], None] = lambda _: None) -> None:
        """Stop every service, newest first; a stop hook runs while the next ones stop, and
        the services it needs stop only once it has finished."""
        if not self.supervisor.running():
            return
        hooks: dict[str, tuple[Service, subprocess.Popen[str] | None]] = {}
        for service in reversed(self.services):
            on_wait(service.name)
            for name, (owner, proc) in list(hooks.items()):
                if service.name in owner.hook_needs:
                    self._finish(owner, proc)
                    del hooks[name]
            self.supervisor.stop(_all(service))
            hooks[service.name] = (service, self._run_stop_hook(service))
        for owner, proc in hooks.values():
            self._finish(owner, proc)
        self.supervisor.shutdown()
        for service in self.services:
            for address, port in service.ports:
                deadline = time.monotonic() + 5
                while port_in_use(address, port) and time.monotonic() < deadline:
                    time.sleep(0.02)

    def restart(self, name: str, *, on_wait: Callable[[str], None] = lambda _: None) -> None:
        """Restart one service of a running suite, with the home's files written anew. A
        service of several processes is restarted one process at a time, each awaited ready
        before the next stops, so that it never stops answering."""
        service = self.service(name)
        if not self.supervisor.running():
            raise ControlError(
                f"cannot restart {name}: the suite is not running (start it with start-all)"
            )
        self.prepare()
        if service.processes == 1 or not self._active(service):
            self.supervisor.stop(_all(service))
            self.start(name, on_wait=on_wait)
            return
        for number, process in enumerate(service.process_names()):
            on_wait(process)
            self.supervisor.stop(process)
            self.supervisor.start(process)
            self._await_process(service, process, number, READY_TIMEOUT)

    def restart_users_of(self, secret: str) -> list[str]:
        """Restart the running services that get ``secret`` (after it changed); their names."""
        restarted = []
        for service in self.services:
            if secret in service.secrets and self._active(service):
                self.restart(service.name)
                restarted.append(service.name)
        return restarted

    def started_before(self) -> bool:
        """Whether a start has ever written this home (its supervisord.conf)."""
        return self.supervisor.conf.exists()

    # --- reporting ----------------------------------------------------------------------------

    def status(self) -> list[Row]:
        restarts = self.restart_counts()
        rows = []
        running = self.supervisor.running()
        for service in self.services:
            for number, process in enumerate(service.process_names()):
                info = self.supervisor.info(process) if running else None
                state = info["statename"] if info else "STOPPED"
                pid = info["pid"] or None if info else None
                uptime = (info["now"] - info["start"]) if info and state == "RUNNING" else None
                which = number if service.processes > 1 else None
                ready = state == "RUNNING" and is_ready(service, self.secrets(), which)
                # supervisord's log names a process of a group by its own name (the number)
                count = restarts.get(
                    process.rsplit(":", 1)[-1] if which is not None else process, 0
                )
                rows.append(Row(process, state, pid, uptime, ready, count))
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


def _all(service: Service) -> str:
    """What supervisord calls every process of ``service`` (its group's, when several)."""
    return service.name if service.processes == 1 else f"{service.name}:*"
