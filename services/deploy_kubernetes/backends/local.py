"""The ``local`` backend: each deployment is a process on this host, in its own process group.

A pid file per deployment (``<state_dir>/<id>.json``: pid, port, process start time) is written
right after the spawn, so a restarted server finds its apps again (and a reused pid is told apart
by its start time). An app is findable before it can run, even if the server dies between the
spawn and its pid file: its environment carries the suite's label and its deployment id, and
:meth:`LocalBackend.list` also looks for session leaders with that label in ``/proc``. Apps survive
a server restart; ``stop`` ends the whole process group.
Memory limits are applied as an address-space rlimit; CPU limits need cgroups and are not enforced
by this backend (the container backends enforce both).

Isolation: apps run as an unprivileged user of their own (see :func:`app_user`), never as root
unless the operator allows it, each in a working directory of its own outside the suite's home
(owned by that user, removed when the app stops). The suite's home and its run and log folders are
kept owner-only, and a different user cannot read the server's ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

from common.background import Supervisor
from common.errors import ConfigError
from common.processes import exited, session_leaders_with, start_time
from common.settings import LocalSettings
from common.spawn import Spawned, spawn
from services.deploy_kubernetes.backends.base import LaunchSpec, Notify, Observed, State
from services.deploy_kubernetes.backends.readiness import OutputWatch, StartTimes, wait_http
from services.deploy_kubernetes.errors import LaunchError
from services.deploy_kubernetes.models import ID_RE, NAME_RE, Template, memory_bytes

PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
STOP_GRACE_SECONDS = 5.0
DEDICATED_USER = "binder-app"
"""The user apps run as by default (``make setup`` creates it when run as root)."""


@dataclass(frozen=True)
class AppUser:
    """The unprivileged user apps run as."""

    name: str
    uid: int
    gid: int


def app_user(settings: LocalSettings) -> AppUser | None:
    """The user apps run as, checked; ``None`` means the server's own (non-root) user.

    Refuses (``ConfigError``, naming the setting) a user that does not exist, root unless
    ``allow_root`` says so, and a user a server that is not root cannot switch to."""
    euid = os.geteuid()
    name = settings.user or (DEDICATED_USER if euid == 0 else "")
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError as exc:
        hint = "run `make setup` as root to create it" if not settings.user else "create it"
        raise ConfigError(
            f"deploy.local.user: there is no user {name!r} for apps on this host; {hint}, "
            "or name another unprivileged user in [deploy.local] user"
        ) from exc
    if entry.pw_uid == 0 and not settings.allow_root:
        raise ConfigError(
            f"deploy.local.user: apps would run as root ({name!r}) and could take over the host; "
            "name an unprivileged user in [deploy.local] user, or set [deploy.local] "
            "allow_root = true to run them as root anyway"
        )
    if entry.pw_uid == euid:
        return None
    if euid != 0:
        raise ConfigError(
            f"deploy.local.user: only a server running as root can run apps as {name!r}"
        )
    return AppUser(name, entry.pw_uid, entry.pw_gid)


def workdir_root(settings: LocalSettings) -> Path:
    """Where the apps' working directories are made: outside the suite's home."""
    return Path(settings.workdir or Path(tempfile.gettempdir()) / f"binder-apps-{os.geteuid()}")


def _private_dir(path: Path, mode: int) -> None:
    """Make ``path`` a directory of this process's user with ``mode``, refusing one that is a
    link or belongs to someone else (the parent may be a shared folder such as /tmp)."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise LaunchError(f"{path} is not a directory of the server's own user")
    if stat.S_IMODE(info.st_mode) != mode:
        path.chmod(mode)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def suite_label(state_dir: Path) -> str:
    """The label (``BINDER_SUITE``) in the environment of every app of the suite whose local
    backend keeps its state in ``state_dir``."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]


@functools.cache
def _run_as() -> str | None:
    """``binder-run-as`` (``run_as.c``), built by ``scripts/setup`` beside this interpreter:
    the memory limit and the switch to the apps' user in one exec, 0.45 ms of CPU per app against
    2.4 ms for ``prlimit`` then ``setpriv``. None where it was not built (no C compiler)."""
    path = Path(sys.executable).with_name("binder-run-as")
    return str(path) if os.access(path, os.X_OK) else None


@functools.cache
def _tool(name: str) -> str:
    """The path of a util-linux tool the backend runs apps through (looked up once, not at
    every launch)."""
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"{name} (util-linux) is not installed: the local backend needs it")
    return path


def _checked_id(dep_id: str) -> str:
    """``dep_id`` if it is a deployment id (32 hex digits), never a path; else ValueError."""
    if not ID_RE.fullmatch(dep_id):
        raise ValueError(f"not a deployment id: {dep_id!r}")
    return dep_id


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "process ended (its exit code is unknown: an earlier deploy server started it)"
    if code < 0:
        return f"process was killed by signal {signal.Signals(-code).name}"
    return f"process exited with code {code}"


class LocalBackend:
    name = "local"
    ready_at_target = True

    def __init__(
        self,
        *,
        state_dir: Path,
        log_dir: Path,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        user: AppUser | None = None,
        workdirs: Path | None = None,
        home: Path | None = None,
        record_delay: float = 0.0,
    ) -> None:
        self._state_dir = state_dir
        self._log_dir = log_dir
        self._user = user
        self._workdirs = workdirs or workdir_root(LocalSettings())
        self._home = home
        self._host = host
        self._python = python
        self._record_delay = record_delay
        self._children: dict[str, Spawned] = {}
        self._starts = StartTimes()
        self._output = OutputWatch()
        self._background = Supervisor()  # the reapers of our own children
        self.suite = suite_label(state_dir)
        """The label in every app's environment (``BINDER_SUITE``) that finds it again."""
        self._notify: Notify | None = None
        self._stopping: set[str] = set()
        self._exit_codes: dict[str, int | None] = {}
        self._ports: dict[str, int] = {}
        """The port of each app of this backend that may still listen (started or adopted)."""
        self._adopted: set[str] = set()
        """Apps of an earlier server whose exit is awaited."""
        self._found = asyncio.Event()
        self.api_calls: dict[str, int] = {}

    async def open(self, notify: Notify) -> None:
        for folder in (self._state_dir, self._log_dir):
            _private_dir(folder, 0o700)
        if self._home is not None:
            _private_dir(self._home, 0o700)  # nothing of the suite readable by the apps
        _private_dir(self._workdirs, 0o711)  # apps reach their own folder, list none
        if self._user is None:
            logger.warning(
                "apps run as the server's own user: they can read the suite's home (run the "
                "suite as root for apps to run as an unprivileged user of their own)"
            )
        self._notify = notify

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {"adopted apps": self._watch_adopted, "app output": self._output.run}

    async def close(self) -> None:
        await self._background.cancel_all()
        self._output.close()

    async def ping(self) -> None:
        return None

    def _pidfile(self, dep_id: str) -> Path:
        return self._state_dir / f"{_checked_id(dep_id)}.json"

    def _log_path(self, dep_id: str) -> Path:
        """The app's output (and the wake-ups of its readiness wait: :class:`OutputWatch`)."""
        return self._log_dir / f"{dep_id}.log"

    def _workdir(self, dep_id: str) -> Path:
        """The app's own working directory (and its HOME), owned by the app's user."""
        path = self._workdirs / _checked_id(dep_id)
        path.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            os.chown(path, self._user.uid, self._user.gid)
        return path

    async def launch(self, spec: LaunchSpec) -> Observed:
        port = self._port_for(spec.id)
        try:
            return await self._launch(spec, port)
        except BaseException:
            if spec.id not in self._children:  # a spawned app keeps its port until it ends
                self._ports.pop(spec.id, None)
            raise

    def _port_for(self, dep_id: str) -> int:
        """A free port for ``dep_id``'s app, and none that an app of this backend holds: the
        kernel hands out free ports at random, so among 50 launched at once two get the same
        port about one time in twelve (and the second app cannot listen)."""
        taken = set(self._ports.values())
        while (port := _free_port(self._host)) in taken:
            pass
        self._ports[dep_id] = port
        return port

    async def _launch(self, spec: LaunchSpec, port: int) -> Observed:
        template = spec.template
        argv = [spec.substitute(w, port=port, python=self._python) for w in template.command]
        try:
            workdir = self._workdir(spec.id)
        except OSError as exc:
            raise LaunchError(f"could not make the app's folder: {exc.strerror or exc}") from exc
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        user = self._user.name if self._user else os.environ.get("USER", "")
        env.update({"HOME": str(workdir), "USER": user, "LOGNAME": user})
        env.update(template.env)
        env.update(
            {
                "PORT": str(port),
                "BASE_URL": spec.base_url,
                "BINDER_ID": spec.id,
                "BINDER_SUITE": self.suite,
                "BINDER_TEMPLATE": template.name,
                "PYTHONUNBUFFERED": "1",
            }
        )
        limit = memory_bytes(template.limits["memory"]) if "memory" in template.limits else None
        log_path = self._log_path(spec.id)

        async def spawn_and_record() -> tuple[Spawned, dict[str, Any]]:
            proc = await self._spawn(argv, env=env, workdir=workdir, log_path=log_path, limit=limit)
            ref = {
                "pid": proc.pid,
                "port": port,
                "started": start_time(proc.pid),
                "template": template.name,
            }
            if self._record_delay:
                await anyio.sleep(self._record_delay)
            self._record(spec.id, ref)
            self._children[spec.id] = proc
            self._background.spawn(self._reap(spec.id, proc, ref))
            return proc, ref

        # spawned and recorded as one step: a launch cancelled (deleted) meanwhile waits for the
        # pid file, so its clean-up finds the app instead of leaving it running unseen
        step = asyncio.ensure_future(spawn_and_record())
        try:
            proc, ref = await asyncio.shield(step)
        except asyncio.CancelledError:
            await asyncio.wait({step})
            with contextlib.suppress(Exception):
                step.result()  # a spawn that failed has nothing to clean up
            raise
        logger.bind(id=spec.id, template=template.name).info(
            "started pid {} on port {}", proc.pid, port
        )
        return Observed(
            spec.id, State.STARTING, f"http://{self._host}:{port}", ref, None, template.name
        )

    def _wrappers(self, limit: int | None) -> list[str]:
        """What runs before the app's command to set its memory limit and switch to the app's
        user, so that the spawn itself needs no code between fork and exec: ``binder-run-as``
        (one exec, built by ``scripts/setup``), else ``prlimit`` and ``setpriv`` (util-linux)."""
        helper = _run_as()
        if helper is not None and (limit or self._user is not None):
            out = [helper, *([f"--as={limit}"] if limit else [])]
            if self._user is not None:
                out += [f"--uid={self._user.uid}", f"--gid={self._user.gid}"]
            return [*out, "--"]
        out = []
        if limit:
            out += [_tool("prlimit"), f"--as={limit}", "--"]
        if self._user is not None:
            user = self._user
            out += [_tool("setpriv"), f"--reuid={user.uid}", f"--regid={user.gid}"]
            out += ["--clear-groups", "--"]
        return out

    async def _spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        workdir: Path,
        log_path: Path,
        limit: int | None,
    ) -> Spawned:
        """The app started from a worker thread (see :mod:`common.spawn`): concurrent launches'
        spawns overlap, and the server goes on while each child waits for a core to exec."""
        wrappers = self._wrappers(limit)
        if wrappers and shutil.which(argv[0], path=env.get("PATH")) is None:
            # the wrapper would fail to run it: say so now, as a failed spawn does
            raise LaunchError(f"could not start {argv[0]!r}: no such program")
        start = functools.partial(spawn, [*wrappers, *argv], env=env, cwd=workdir, output=log_path)
        try:
            return await anyio.to_thread.run_sync(start)
        except OSError as exc:
            raise LaunchError(f"could not start {argv[0]!r}: {exc.strerror or exc}") from exc

    async def _reap(self, dep_id: str, proc: Spawned, ref: dict[str, Any]) -> None:
        await exited(proc.pid)
        code = proc.wait()
        self._exit_codes[dep_id] = code
        self._children.pop(dep_id, None)
        self._ports.pop(dep_id, None)
        if dep_id in self._stopping or self._notify is None:
            return
        await self._notify(
            Observed(dep_id, State.EXITED, None, ref, _exit_reason(code), ref.get("template"))
        )

    async def _watch_adopted(self) -> None:
        """Apps started by an earlier server are not our children: the kernel tells of each one's
        exit (its pidfd turns readable). The pid files are looked at when this starts and when
        :meth:`list` has found apps, never on a timer."""
        while True:
            for obs in self._recorded():
                if obs.id in self._children or obs.id in self._adopted:
                    continue
                if obs.state is State.EXITED:
                    await self._adopted_exited(obs)
                else:
                    self._adopted.add(obs.id)
                    self._ports[obs.id] = int(obs.ref.get("port") or 0)
                    self._background.spawn(self._await_exit(obs))
            await self._found.wait()
            self._found.clear()

    async def _await_exit(self, obs: Observed) -> None:
        try:  # the pid is the app's only while its start time is (a reused pid is not waited on)
            await exited(int(obs.ref["pid"]), started=obs.ref.get("started"))
        finally:
            self._adopted.discard(obs.id)
            self._ports.pop(obs.id, None)
        await self._adopted_exited(
            Observed(obs.id, State.EXITED, None, obs.ref, _exit_reason(None), obs.template)
        )

    async def _adopted_exited(self, obs: Observed) -> None:
        if obs.id not in self._stopping and self._notify is not None:
            await self._notify(obs)

    def _alive(self, ref: dict[str, Any]) -> bool:
        pid, started = ref.get("pid"), ref.get("started")
        return isinstance(pid, int) and started is not None and start_time(pid) == started

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        async def alive() -> str | None:
            proc = self._children.get(spec.id)
            if proc is not None and proc.poll() is not None:
                return _exit_reason(proc.returncode)
            if proc is None and not self._alive(observed.ref):
                return _exit_reason(self._exit_codes.get(spec.id))
            return None

        assert observed.target is not None
        with self._output.hints(self._log_path(spec.id)) as hints:
            await wait_http(
                observed.target + spec.base_url,
                deadline=deadline,
                alive=alive,
                starts=self._starts,
                template=spec.template.name,
                hints=hints,
            )
        return Observed(
            spec.id, State.RUNNING, observed.target, observed.ref, None, observed.template
        )

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        _checked_id(dep_id)  # never a path: the folder and pid file below are named by it
        self._stopping.add(dep_id)
        try:
            if not ref:
                found = [o.ref for o in self._unrecorded(set()) if o.id == dep_id]
                ref = self._read(dep_id) or (found[0] if found else {})
            if self._alive(ref):
                await self._kill_group(int(ref["pid"]))
            proc = self._children.get(dep_id)
            if proc is not None and proc.poll() is None:
                await self._kill_group(proc.pid)
            self._pidfile(dep_id).unlink(missing_ok=True)
            self._exit_codes.pop(dep_id, None)
            await anyio.to_thread.run_sync(self._remove_workdir, dep_id)
        finally:
            self._stopping.discard(dep_id)

    def _remove_workdir(self, dep_id: str) -> None:
        try:
            shutil.rmtree(self._workdirs / _checked_id(dep_id))  # follows no symbolic link
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.bind(id=dep_id).warning("could not remove the app's folder: {}", exc)

    async def _kill_group(self, pid: int) -> None:
        started = start_time(pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if started is not None:
            with anyio.move_on_after(STOP_GRACE_SECONDS):
                await exited(pid, started=started)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def _record(self, dep_id: str, ref: dict[str, Any]) -> None:
        tmp = self._pidfile(dep_id).with_suffix(".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with open(os.open(tmp, flags, 0o600), "w") as out:  # never through a planted link
            out.write(json.dumps(ref))
        tmp.replace(self._pidfile(dep_id))

    def _read(self, dep_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._pidfile(dep_id).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _unrecorded(self, recorded: set[str]) -> list[Observed]:
        """Apps of this suite that run without a pid file (the server died before writing it).

        An app controls its own environment (and can start a process with any environment): what
        is read from it is never trusted as a path or a name. A process whose id is not 32 hex
        digits, whose port is not a port or whose template is not a name is not adopted."""
        out = []
        for pid, env in session_leaders_with("BINDER_SUITE", self.suite).items():
            dep_id = env.get("BINDER_ID", "")
            if dep_id in recorded or not ID_RE.fullmatch(dep_id):
                continue
            port = env.get("PORT", "")
            template = env.get("BINDER_TEMPLATE")
            if not (port.isdigit() and 0 < int(port) < 65536):
                continue
            if template is not None and not NAME_RE.fullmatch(template):
                continue
            ref: dict[str, Any] = {"pid": pid, "port": int(port)}
            ref |= {"started": start_time(pid), "template": template}
            target = f"http://{self._host}:{ref['port']}"
            out.append(Observed(dep_id, State.RUNNING, target, ref, None, template))
        return out

    def _recorded(self) -> list[Observed]:
        out = []
        for path in sorted(self._state_dir.glob("*.json")):
            if not ID_RE.fullmatch(path.stem):
                continue
            ref = self._read(path.stem)
            if ref is None:
                continue
            proc = self._children.get(path.stem)
            running = (proc is not None and proc.poll() is None) or self._alive(ref)
            out.append(
                Observed(
                    path.stem,
                    State.RUNNING if running else State.EXITED,
                    f"http://{self._host}:{ref.get('port')}",
                    ref,
                    None if running else _exit_reason(self._exit_codes.get(path.stem)),
                    ref.get("template"),
                )
            )
        return out

    async def list(self) -> list[Observed]:
        """Every app of the suite: those with pid files, and those found by their environment,
        which get their pid file now (so their exit is watched from here on)."""
        recorded = self._recorded()
        found = self._unrecorded({obs.id for obs in recorded})
        for obs in found:
            logger.bind(id=obs.id).warning("found app pid {} without a pid file", obs.ref["pid"])
            self._record(obs.id, obs.ref)
        self._found.set()  # their exits are watched from now on
        return recorded + found

    async def preload(self, template: Template) -> None:
        return None  # nothing to pull: the command runs from this host

    async def preload_status(self, template: Template) -> str:
        return "completed"
