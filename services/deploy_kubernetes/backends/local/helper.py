"""``binder-sandbox`` (``sandbox.c``, built by ``scripts/setup`` beside the interpreter): what every
app of the local backend is started through, and the words it is given.

Sandboxed apps (``[deploy.local] sandbox = true``, the default): a helper parked ahead of the
launch in the slot's cgroups and network namespace (:mod:`.slots`, :func:`park_words`) has
already started ``bwrap`` (:func:`bwrap_args`) as the app's own uid, which made the app's mount,
pid, ipc, uts, user and cgroup namespaces and its view of the file system around a waiter
(``binder-sandbox --wait``). At the launch the helper gets a launch request
(:func:`launch_request`) and hands the app's command and environment to the waiter, which execs
the app in place; the helper stays as the app's parent (the shim: the log's bound, the exit
status).

Why bwrap and not the helper's own namespace code: bubblewrap is a small, audited tool made for
exactly this and kept by others (Debian's ``bubblewrap``); mount, namespace and seccomp code of
our own, running as root, would be ours to audit. What it costs is paid ahead of the launch, with
the slot (``scripts/bench launch --sandbox compare`` prints the parts): bwrap's setup took
1.3-1.5 ms from a launch request to the app's first byte on a quiet host and 5.3 ms on a busy
one when it ran on the launch path; parked, a launch hands the waiter its words over a socket
and the app execs in a sandbox already made. The helper keeps only what bwrap does not do: the
cgroup join, the setns, the uid switch, the park, the waiter, the shim and the status.

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


def park_words(
    cgroups: list[str],
    netns: Path,
    *,
    uid: int,
    sandbox: list[str],
    reach: list[Path] | None = None,
) -> list[str]:
    """A parked helper's command line (:mod:`.slots`): it joins ``cgroups`` and ``netns`` and
    starts ``sandbox`` (``bwrap`` and its arguments; none: the waiter alone, in the host's view)
    around the waiter, as ``uid`` (its gid too), ``reach`` made reachable first
    (:func:`closed_to_others`)."""
    return [
        helper(),
        "--park",
        *(f"--cgroup={d}" for d in cgroups),
        f"--netns={netns}",
        f"--uid={uid}",
        f"--gid={uid}",
        *(f"--reach={folder}" for folder in reach or ()),
        "--",
        *([*sandbox, "--"] if sandbox else []),
        helper(),
        "--wait",
    ]


def launch_request(
    *,
    log: Path,
    log_max: int,
    status: Path,
    argv: list[str],
    env: dict[str, str],
) -> bytes:
    """What a parked helper reads from its stdin to launch ``argv`` (looked up on the ``PATH``
    of ``env``) in its sandbox: NUL-terminated words, the environment after an empty one."""
    words = [
        f"--log={log}",
        f"--log-max={log_max}",
        f"--status={status}",
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
