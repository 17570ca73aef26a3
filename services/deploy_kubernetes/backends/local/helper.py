"""``binder-sandbox`` (``sandbox.c``, built by ``scripts/setup`` beside the interpreter): what every
app of the local backend is started through, and the words it is given.

Sandboxed apps (``[deploy.local] sandbox = true``, the default): a helper parked ahead of the
launch in the slot's cgroups and network namespace (:mod:`.slots`) gets a launch request
(:func:`launch_request`); it stays as the app's parent (the shim: the log's bound, the exit
status) and execs ``bwrap`` (:func:`bwrap_args`) as the app's own uid, which makes the app's
mount, pid, ipc, uts, user and cgroup namespaces and its view of the file system.

Why bwrap and not the helper's own namespace code: bubblewrap is a small, audited tool made for
exactly this and kept by others (Debian's ``bubblewrap``); mount, namespace and seccomp code of
our own, running as root, would be ours to audit. What it costs (``scripts/bench launch --sandbox
compare``, a quiet host): from the launch request to the app's first byte, 5.3 ms with bwrap
against 1.0 ms without it (the parked helper's uid switch and shim cost nothing measurable over
the direct form). A prototype making the same namespaces in C reached the first line 8-15 ms
sooner than bwrap on this busy two-core host, at the price of mount and seccomp code of our own
run as root. End to end, a sandboxed launch of the example app costs 10-11 ms more than an
unsandboxed one (18 ms over the app's own start). The helper keeps only what bwrap does not do:
the cgroup join, the setns, the uid switch, the park, the shim and the status.

Trusted templates (``sandbox = false``): the direct form (:func:`direct_words`) sets the memory
limit (``RLIMIT_AS``) and switches to the apps' user in one exec, and the app runs in place, on the
host's network, as before the sandbox.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from services.deploy_kubernetes.backends.local.users import AppUser

INSTALLATION = Path(__file__).resolve().parents[4]
"""The suite's checkout, whose code apps of its own templates run (``{python} -m ...``)."""


def installation() -> list[Path]:
    """The folders apps run the suite's own code and interpreter from."""
    return [INSTALLATION, Path(sys.prefix)]


SETUP_FD = 3
"""The descriptor bwrap writes its status to (``--json-status-fd``), which binder-sandbox reads to
tell a sandbox that could not be set up (run again) from an app that ran and ended."""
APP_HOME = "/home/app"
"""The app's working folder and ``HOME`` inside its sandbox, on a tmpfs of its own."""
COVERED = ("/tmp", "/var/tmp", "/run", "/home", "/root", "/dev", "/proc")
"""Folders that are a fresh tmpfs (or /dev, /proc) in every sandbox."""


@functools.cache
def helper() -> str:
    """The path of ``binder-sandbox``; ``ConfigError`` where ``scripts/setup`` did not build it."""
    path = Path(sys.executable).with_name("binder-sandbox")
    if not os.access(path, os.X_OK):
        raise ConfigError(
            f"{path} is missing: the local backend starts apps through it; run `make setup` "
            "(it builds it with the system's C compiler)"
        )
    return str(path)


@functools.cache
def bwrap() -> str:
    """The path of ``bwrap``; ``ConfigError`` where it is not installed."""
    found = shutil.which("bwrap", path="/usr/bin:/usr/local/bin:/bin")
    if found is None:
        raise ConfigError(
            "bwrap is missing: sandboxed local apps run in bubblewrap; run `make setup` as root "
            "(it installs Debian's bubblewrap), or set [deploy.local] sandbox = false for "
            "trusted templates only"
        )
    return found


def direct_words(
    limit: int | None, user: AppUser | None, reach: list[Path] | None = None
) -> list[str]:
    """The words before a trusted app's command that set its memory ``limit`` (bytes of address
    space), make ``reach`` reachable (:func:`closed_to_others`) and switch to ``user``."""
    out = [helper(), *([f"--as={limit}"] if limit else [])]
    if user is not None:
        out += [f"--uid={user.uid}", f"--gid={user.gid}"]
    out += [f"--reach={folder}" for folder in reach or ()]
    return [*out, "--"]


def park_words(cgroups: list[str], netns: Path) -> list[str]:
    """A parked helper's command line (:mod:`.slots`)."""
    return [helper(), "--park", *(f"--cgroup={d}" for d in cgroups), f"--netns={netns}"]


def launch_request(
    *,
    uid: int,
    log: Path,
    log_max: int,
    status: Path,
    argv: list[str],
    env: dict[str, str],
    setup_fd: int | None = None,
    reach: list[Path] | None = None,
) -> bytes:
    """What a parked helper reads from its stdin to launch ``argv`` (bwrap and the app) as
    ``uid`` (its gid too): NUL-terminated words, the environment after an empty one.
    ``setup_fd``: bwrap's ``--json-status-fd``, so that a sandbox that could not be set up is
    made again. ``reach``: folders the app runs from that the helper makes reachable for it
    (:func:`closed_to_others`)."""
    words = [
        f"--uid={uid}",
        f"--gid={uid}",
        f"--log={log}",
        f"--log-max={log_max}",
        f"--status={status}",
        *([f"--setup-fd={setup_fd}"] if setup_fd is not None else []),
        *(f"--reach={folder}" for folder in reach or ()),
        "--",
        *argv,
        "",
        *(f"{k}={v}" for k, v in env.items()),
    ]
    if any("\0" in word for word in words):
        raise ValueError("a word of the launch request holds a NUL")
    return b"".join(os.fsencode(word) + b"\0" for word in words)


@dataclass(frozen=True)
class Sizes:
    """Bytes of each writable tmpfs of a sandbox (its pages count against the app's memory
    limit too: the writable space is bounded by both)."""

    home: int = 512 << 20
    tmp: int = 256 << 20
    shm: int = 64 << 20


def bwrap_args(
    *,
    hidden: list[Path],
    sizes: Sizes,
    reachable: Callable[[Path], bool],
    shown: list[Path] | None = None,
) -> list[str]:
    """bwrap's arguments (between ``bwrap`` and ``--``): every namespace new but the network
    (the slot's, entered before), no nested user namespace, a new session (no terminal to push
    input into), the system read-only, private ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run``,
    ``/root`` and ``/home`` with ``/home/app`` (0700) the working folder, each folder of
    ``shown`` (the suite's own installation, which apps run from: its interpreter and code) that
    one of those private folders would cover bound there again read-only, and each folder of
    ``hidden`` that the app's user could reach (``reachable``) covered by an empty one.
    Never ``--die-with-parent``: apps outlive the server."""
    args = [
        "--json-status-fd",  # "exit-code" there once the app ran (see binder-sandbox's --setup-fd)
        str(SETUP_FD),
        "--unshare-all",
        "--share-net",
        "--unshare-user",
        "--disable-userns",
        "--new-session",
        "--hostname",
        "app",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    for path, mode, size in (
        ("/dev/shm", "1777", sizes.shm),
        ("/tmp", "1777", sizes.tmp),
        ("/var/tmp", "1777", sizes.tmp),
        ("/run", "0755", 65536),
        ("/home", "0755", sizes.home),
    ):
        args += ["--perms", mode, "--size", str(size), "--tmpfs", path]
    args += ["--perms", "0700", "--dir", APP_HOME]
    args += ["--perms", "0700", "--size", "4096", "--tmpfs", "/root"]
    covered = [Path(p) for p in COVERED]

    def under(folder: Path, tops: list[Path]) -> bool:
        return any(folder == t or t in folder.parents for t in tops)

    binds = sorted({Path(os.path.abspath(p)) for p in shown or () if under(Path(p), covered)})
    binds = [b for b in binds if not under(b, [o for o in binds if o != b])]  # outermost
    for folder in binds:
        args += ["--ro-bind", str(folder), str(folder)]
    for folder in sorted({Path(os.path.abspath(p)) for p in hidden}):
        if (under(folder, covered) and not under(folder, binds)) or not reachable(folder):
            continue
        args += ["--perms", "0000", "--size", "4096", "--tmpfs", str(folder)]
    return [*args, "--chdir", APP_HOME]


def closed_to_others(
    folders: list[Path], reachable: Callable[[Path], bool] | None = None
) -> list[Path]:
    """The folders of ``folders`` (the suite's installation) that the apps' users cannot reach
    (a clone in a 0700 ``mktemp -d`` folder, a checkout in root's home), outermost ones only:
    bwrap, run as the app's user, could not show them, so the parked helper makes them
    reachable in the app's own mount namespace first (its ``--reach``)."""
    reachable = reachable or reachable_by_others
    real = sorted({Path(os.path.realpath(f)) for f in folders})
    outer = [f for f in real if not any(o != f and o in f.parents for o in real)]
    return [f for f in outer if f.is_dir() and not reachable(f)]


def reachable_by_others(path: Path) -> bool:
    """Whether a user that owns nothing on the way (an app) could reach the folder ``path``:
    every folder above it searchable by others."""
    for parent in reversed(path.parents):
        try:
            if not os.stat(parent).st_mode & 0o001:
                return False
        except OSError:
            return False
    return path.is_dir()
