"""Rendering ``supervisord.conf`` from the effective settings: a pure function, golden-tested."""

from __future__ import annotations

import shlex
from pathlib import Path

from control.services import Service


def _quote(argv: tuple[str, ...] | list[str]) -> str:
    # supervisord expands %(...)s in commands: a literal % must be doubled
    return " ".join(shlex.quote(a) for a in argv).replace("%", "%%")


def render(*, home: Path, python: str, services: list[Service]) -> str:
    """The whole configuration. Secrets are not in it: ``control.launch``, which starts every
    program once its ports are free, reads them from the owner-only ``secrets.env`` for a
    program that needs them."""
    logs = home / "logs"
    lines = [
        "; rendered by binder-control; edits are overwritten by the next start-all",
        "[unix_http_server]",
        f"file={home / 'supervisor.sock'}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={logs / 'supervisord.log'}",
        "logfile_maxbytes=10MB",
        "logfile_backups=3",
        f"pidfile={home / 'supervisord.pid'}",
        f"childlogdir={logs}",
        f"directory={home}",
        "identifier=binder",
        "umask=077",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{home / 'supervisor.sock'}",
    ]
    for service in services:
        if service.external:
            continue
        launch = [python, "-m", "control.launch"]
        if service.secrets:
            launch += ["--secrets", str(home / "secrets.env"), ",".join(service.secrets)]
        if service.ports:
            launch += ["--ports", ",".join(f"{host}:{port}" for host, port in service.ports)]
        if service.processes > 1:
            launch += ["--shared-ports"]
        command = [*launch, "--", *service.command]
        env = {"BINDER_HOME": str(home), "PYTHONUNBUFFERED": "1", **service.env}
        several = service.processes > 1
        # supervisord expands %(process_num)d in a program's names, log files and environment
        number = ".%(process_num)d" if several else ""
        if several:
            env = {k: v.replace("{n}", "%(process_num)d") for k, v in env.items()}
        lines += [
            "",
            f"[program:{service.name}]",
            f"command={_quote(command)}",
            *([f"numprocs={service.processes}", "process_name=%(process_num)d"] if several else []),
            f"priority={service.priority}",
            "autostart=false",  # binder-control starts them in order, each awaited ready
            "autorestart=true",
            "startsecs=1",
            "startretries=3",
            "stopsignal=TERM",
            f"stopwaitsecs={service.stop_seconds}",
            "stopasgroup=true",
            "killasgroup=true",
            f"stdout_logfile={logs / f'{service.name}.out{number}.log'}",
            "stdout_logfile_maxbytes=10MB",
            "stdout_logfile_backups=5",
            f"stderr_logfile={logs / f'{service.name}.err{number}.log'}",
            "stderr_logfile_maxbytes=10MB",
            "stderr_logfile_backups=5",
            "environment=" + ",".join(f'{k}="{v}"' for k, v in sorted(env.items())),
        ]
    return "\n".join(lines) + "\n"
