"""Rendering ``supervisord.conf`` from the effective settings: a pure function, golden-tested."""

from __future__ import annotations

import shlex
from pathlib import Path

from control.services import Service

PRIORITY = {"db": 10, "logging": 20, "proxy": 30, "deploy-kubernetes": 40}


def _quote(argv: tuple[str, ...] | list[str]) -> str:
    # supervisord expands %(...)s in commands: a literal % must be doubled
    return " ".join(shlex.quote(a) for a in argv).replace("%", "%%")


def render(*, home: Path, python: str, services: list[Service]) -> str:
    """The whole configuration. Secrets are not in it: ``control.launch`` reads them from the
    owner-only ``secrets.env`` when it starts a program that needs them."""
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
        command = list(service.command)
        if service.secrets:
            command = [
                python,
                "-m",
                "control.launch",
                str(home / "secrets.env"),
                ",".join(service.secrets),
                "--",
                *command,
            ]
        env = {"BINDER_HOME": str(home), "PYTHONUNBUFFERED": "1", **service.env}
        lines += [
            "",
            f"[program:{service.name}]",
            f"command={_quote(command)}",
            f"priority={PRIORITY.get(service.name, 50)}",
            "autostart=false",  # binder-control starts them in order, each awaited ready
            "autorestart=true",
            "startsecs=1",
            "startretries=3",
            "stopsignal=TERM",
            f"stopwaitsecs={service.stop_seconds}",
            "stopasgroup=true",
            "killasgroup=true",
            f"stdout_logfile={logs / f'{service.name}.out.log'}",
            "stdout_logfile_maxbytes=10MB",
            "stdout_logfile_backups=5",
            f"stderr_logfile={logs / f'{service.name}.err.log'}",
            "stderr_logfile_maxbytes=10MB",
            "stderr_logfile_backups=5",
            "environment=" + ",".join(f'{k}="{v}"' for k, v in sorted(env.items())),
        ]
    return "\n".join(lines) + "\n"
