"""``python -m control.launch [--secrets ENV_FILE NAMES] [--ports HOST:PORT,...] [--shared-ports]
-- ARGV...``: exec ARGV once its ports are free, with the named secrets of ENV_FILE added to its
environment (so that no secret is ever on a command line). With ``--shared-ports`` the ports are
shared by the service's processes (``SO_REUSEPORT``): held by its siblings they are free.

Every service starts through it. A port another program holds (an app that bound it while the
service restarted) would make the service fail at once, supervisord retry it three times within
seconds and leave it FATAL; instead, the launcher says on stderr (the service's error log, which
the aggregator follows) which user holds the port, and looks again with backoff, from
``FIRST_LOOK_SECONDS`` up to ``LAST_LOOK_SECONDS`` apart, until it is free.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common.peers import listeners
from control.secrets import read_env_file

FIRST_LOOK_SECONDS = 0.25
LAST_LOOK_SECONDS = 10.0
USAGE = (
    "usage: python -m control.launch [--secrets ENV_FILE NAMES] [--ports HOST:PORT,...] "
    "[--shared-ports] -- ARGV"
)


def free(host: str, port: int, *, shared: bool = False) -> bool:
    """Whether the service could bind ``host:port`` now (with ``SO_REUSEADDR``, as servers do:
    connections of its former self that are closing do not count; and with ``SO_REUSEPORT``
    when ``shared``: the other processes of the service hold it too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:  # another error (no such address, a privileged port) is the
            return exc.errno != errno.EADDRINUSE  # service's to report when it binds
    return True


def holders(port: int) -> str:
    """Who listens on ``port``, for the message."""
    names = []
    for uid in sorted({found.uid for found in listeners(port)}):
        try:
            names.append(f"user {uid} ({pwd.getpwuid(uid).pw_name})")
        except KeyError:
            names.append(f"user {uid}")
    return ", ".join(names) or "a socket that does not listen"


def wait_for_ports(
    ports: list[tuple[str, int]],
    *,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    shared: bool = False,
) -> None:
    """Return once every one of ``ports`` is free, saying which are not each time it looks."""
    delay = FIRST_LOOK_SECONDS
    name = os.environ.get("SUPERVISOR_PROCESS_NAME", "launch")
    while taken := [(host, port) for host, port in ports if not free(host, port, shared=shared)]:
        for host, port in taken:
            say(
                f"{name}: port {port} ({host}) is taken by {holders(port)}; the service starts "
                f"once it is free (next look in {delay:g} s)"
            )
        sleep(delay)
        delay = min(delay * 2, LAST_LOOK_SECONDS)


def _parse(
    argv: list[str],
) -> tuple[Path | None, list[str], list[tuple[str, int]], bool, list[str]]:
    if "--" not in argv:
        sys.exit(USAGE)
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    env_file, names, ports, shared = None, [], [], False
    while options:
        option = options.pop(0)
        if option == "--shared-ports":
            shared = True
        elif option == "--secrets" and len(options) >= 2:
            env_file, names = Path(options.pop(0)), [n for n in options.pop(0).split(",") if n]
        elif option == "--ports" and options:
            for item in options.pop(0).split(","):
                host, _, port = item.rpartition(":")
                if not host or not port.isdigit():
                    sys.exit(f"launch: {item!r} is not HOST:PORT\n{USAGE}")
                ports.append((host.strip("[]"), int(port)))
        else:
            sys.exit(USAGE)
    if not command:
        sys.exit(USAGE)
    return env_file, names, ports, shared, command


def main(argv: list[str]) -> None:
    env_file, names, ports, shared, command = _parse(argv)
    env = dict(os.environ)
    if env_file is not None:
        values = read_env_file(env_file)
        for name in names:
            if name not in values:
                sys.exit(f"launch: {name} is missing from {env_file}")
            env[name] = values[name]

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    wait_for_ports(ports, say=say, shared=shared)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
