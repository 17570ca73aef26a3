"""The ``local`` backend without a sandbox (``[deploy.local] sandbox = false``: trusted templates
only): each deployment is a process on this host, in its own process group, as the apps' user,
on the host's network (the sandboxed backend is :mod:`.sandboxed`).

Its parts, each a module of this package: the apps' user (:mod:`.users`), their folders
(:mod:`.folders`), the pid files that find them again after a restart (:mod:`.state`), the search
of ``/proc`` for apps without one (:mod:`.discovery`), what an app is started through
(:mod:`.helper`) and the spawn itself (:mod:`.spawn`). Apps survive a server restart; ``stop`` ends
the whole process group.

Memory limits are applied as an address-space rlimit; CPU limits need cgroups and are not enforced
by this backend (the container backends enforce both).

Isolation: apps run as an unprivileged user of their own, never as root unless the operator allows
it, each in a working directory of its own outside the suite's home (owned by that user, removed
when the app stops). The suite's home and its run and log folders are kept owner-only, and a
different user cannot read the server's ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

from common.background import LoopSupervisor
from common.errors import ConfigError
from common.processes import exited, start_time
from common.settings import LocalSettings
from services.deploy_kubernetes.backends.base import (
    LaunchSpec,
    Lines,
    Notify,
    Observed,
    State,
    last_lines,
)
from services.deploy_kubernetes.backends.local.discovery import unrecorded
from services.deploy_kubernetes.backends.local.folders import (
    Workdirs,
    checked_id,
    private_dir,
    workdir_root,
)
from services.deploy_kubernetes.backends.local.helper import (
    closed_to_others,
    direct_words,
    installation,
)
from services.deploy_kubernetes.backends.local.spawn import Child, spawn
from services.deploy_kubernetes.backends.local.state import PidFiles, still_running, suite_label
from services.deploy_kubernetes.backends.local.users import AppUser
from services.deploy_kubernetes.backends.readiness import OutputWatch, StartTimes, wait_http
from services.deploy_kubernetes.errors import LaunchError
from services.deploy_kubernetes.models import Template, memory_bytes

PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
STOP_GRACE_SECONDS = 5.0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "process ended (its exit code is unknown: an earlier deploy server started it)"
    if code < 0:
        return f"process was killed by signal {signal.Signals(-code).name}"
    return f"process exited with code {code}"


class LocalBackend:
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
        self._pids = PidFiles(state_dir)
        self._log_dir = log_dir
        self._user = user
        self._reach = closed_to_others(installation()) if user is not None else []
        """The installation's folders an app run as ``user`` could not reach without help."""
        self._workdirs = Workdirs(workdirs or workdir_root(LocalSettings()), user)
        self._home = home
        self._host = host
        self._python = python
        self._record_delay = record_delay
        self._children: dict[str, Child] = {}
        self._starts = StartTimes()
        self._output = OutputWatch()
        self._background = LoopSupervisor()  # the reapers of our own children
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
        for folder in (self._pids.folder, self._log_dir):
            private_dir(folder, 0o700)
        if self._home is not None:
            private_dir(self._home, 0o700)  # nothing of the suite readable by the apps
        self._workdirs.open()
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

    def _log_path(self, dep_id: str) -> Path:
        """The app's output (and the wake-ups of its readiness wait: :class:`OutputWatch`)."""
        return self._log_dir / f"{checked_id(dep_id)}.log"

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
            workdir = self._workdirs.make(spec.id)
        except OSError as exc:
            raise LaunchError(f"could not make the app's folder: {exc.strerror or exc}") from exc
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        user = self._user.name if self._user else os.environ.get("USER", "")
        env.update({"HOME": str(workdir), "USER": user, "LOGNAME": user})
        env.update(spec.environment(port=port, python=self._python))
        env.update(
            {
                "BINDER_SUITE": self.suite,
                "BINDER_TEMPLATE": template.name,
                "PYTHONUNBUFFERED": "1",
            }
        )
        limit = memory_bytes(template.limits["memory"]) if "memory" in template.limits else None
        log_path = self._log_path(spec.id)

        async def spawn_and_record() -> tuple[Child, dict[str, Any]]:
            proc = await self._spawn(argv, env=env, workdir=workdir, log_path=log_path, limit=limit)
            ref = {
                "pid": proc.pid,
                "port": port,
                "started": start_time(proc.pid),
                "template": template.name,
            }
            if self._record_delay:
                await anyio.sleep(self._record_delay)
            self._pids.write(spec.id, ref)
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
            id=spec.id,
            state=State.STARTING,
            target=f"http://{self._host}:{port}",
            ref=ref,
            template=template.name,
        )

    async def _spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        workdir: Path,
        log_path: Path,
        limit: int | None,
    ) -> Child:
        """The app started through ``binder-sandbox``'s direct form (:mod:`.helper`) from a worker thread (see
        :mod:`.spawn`): concurrent launches' spawns overlap, and the server goes on while each
        child waits for a core to exec."""
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            # the helper would fail to run it: say so now, as a failed spawn does
            raise LaunchError(f"could not start {argv[0]!r}: no such program")
        try:
            before = direct_words(limit, self._user, self._reach)
        except ConfigError as exc:
            raise LaunchError(exc.message) from exc
        start = functools.partial(spawn, [*before, *argv], env=env, cwd=workdir, output=log_path)
        try:
            return await anyio.to_thread.run_sync(start)
        except OSError as exc:
            raise LaunchError(f"could not start {argv[0]!r}: {exc.strerror or exc}") from exc

    async def _reap(self, dep_id: str, proc: Child, ref: dict[str, Any]) -> None:
        await exited(proc.pid)
        code = proc.wait()
        self._exit_codes[dep_id] = code
        self._children.pop(dep_id, None)
        self._ports.pop(dep_id, None)
        if dep_id in self._stopping or self._notify is None:
            return
        await self._notify(
            Observed(
                id=dep_id,
                state=State.EXITED,
                ref=ref,
                reason=_exit_reason(code),
                template=ref.get("template"),
            )
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
            Observed(
                id=obs.id,
                state=State.EXITED,
                ref=obs.ref,
                reason=_exit_reason(None),
                template=obs.template,
            )
        )

    async def _adopted_exited(self, obs: Observed) -> None:
        if obs.id not in self._stopping and self._notify is not None:
            await self._notify(obs)

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        async def alive() -> str | None:
            proc = self._children.get(spec.id)
            if proc is not None and proc.poll() is not None:
                return _exit_reason(proc.returncode)
            if proc is None and not still_running(observed.ref):
                return _exit_reason(self._exit_codes.get(spec.id))
            return None

        assert observed.target is not None
        with self._output.hints(self._log_path(spec.id)) as hints:
            await wait_http(
                observed.target + spec.ready_path,
                deadline=deadline,
                alive=alive,
                starts=self._starts,
                template=spec.template.name,
                hints=hints,
            )
        return observed.running()

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        self._stopping.add(dep_id)
        try:
            if not ref:
                found = [o.ref for o in self._unrecorded(set()) if o.id == dep_id]
                ref = self._pids.read(dep_id) or (found[0] if found else {})
            if still_running(ref):
                await self._kill_group(int(ref["pid"]))
            proc = self._children.get(dep_id)
            if proc is not None and proc.poll() is None:
                await self._kill_group(proc.pid)
            self._pids.remove(dep_id)
            self._exit_codes.pop(dep_id, None)
            await anyio.to_thread.run_sync(self._workdirs.remove, dep_id)
        finally:
            self._stopping.discard(dep_id)

    async def _kill_group(self, pid: int) -> None:
        started = start_time(pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if started is not None:
            with anyio.move_on_after(STOP_GRACE_SECONDS):
                await exited(pid, started=started)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def _unrecorded(self, recorded: set[str]) -> list[Observed]:
        """Apps of this suite that run without a pid file (see :mod:`.discovery`)."""
        uid = self._user.uid if self._user is not None else os.geteuid()
        return unrecorded(self.suite, recorded, host=self._host, uid=uid)

    def _recorded(self) -> list[Observed]:
        out = []
        for dep_id in self._pids.ids():
            ref = self._pids.read(dep_id)
            if ref is None:
                continue
            proc = self._children.get(dep_id)
            running = (proc is not None and proc.poll() is None) or still_running(ref)
            out.append(
                Observed(
                    id=dep_id,
                    state=State.RUNNING if running else State.EXITED,
                    target=f"http://{self._host}:{ref.get('port')}",
                    ref=ref,
                    reason=None if running else _exit_reason(self._exit_codes.get(dep_id)),
                    template=ref.get("template"),
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
            self._pids.write(obs.id, obs.ref)
        self._found.set()  # their exits are watched from now on
        return recorded + found

    async def output(self, dep_id: str, *, lines: int) -> Lines:
        return await anyio.to_thread.run_sync(last_lines, self._log_path(dep_id), lines)

    async def preload(self, template: Template) -> None:
        return None  # nothing to pull: the command runs from this host

    async def preload_status(self, template: Template) -> str:
        return "completed"
