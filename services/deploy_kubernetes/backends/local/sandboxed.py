"""The ``local`` backend with every app in a sandbox of its own (``[deploy.local] sandbox = true``,
the default; SPEC section 7): the code of anonymous people runs here.

Each app has its own uid and gid (:mod:`.uids`), its own cgroup with the template's memory, CPU
and pids limits over its whole process tree (:mod:`.cgroups`), its own network namespace reached
by the proxy at its own address (:mod:`.network`), and its own mount, pid, ipc, uts and user
namespaces made by bubblewrap, with a private HOME (``/home/app``), ``/tmp``, ``/var/tmp`` and
``/dev/shm`` on tmpfs (bounded, and counted in its memory) and the rest of the system read-only,
the suite's home hidden (:mod:`.helper`). Slots are made ahead of launches (:mod:`.slots`). Its
output goes through its shim into ``logs/apps/<id>.log``, bounded.

Found again after a restart by the suite's own cgroups (:meth:`Cgroups.apps`), its namespace by
the inode of a member's ``/proc/<pid>/ns/net``, its uid from the kernel's view of a member; the
port and template from the record written before the launch in the suite's root-only state
folder. Nothing an app controls is read for an id, a path or a decision.

Ending (delete, cull, failure, ``stop-all``) ends the whole group at once (:mod:`.groups`), then
removes its cgroup and namespace: no process, file, port or address of it is left.

Several deploy servers of the suite share the host (``[deploy] servers = N``): slot numbers and
uids are claimed (:mod:`.claims`), so no two servers make one slot or hand out one uid, and a
slot's namespace is removed only by the server holding its claim. Any server may end any app of
the suite (a delete reaches whichever server the kernel hands it to): one that does not hold the
app's claims ends its group and leaves the namespace to the holder, whose sweep
(:meth:`SandboxedBackend.sweep`) finishes what another server ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

from common.background import LoopSupervisor
from common.errors import ConfigError
from common.processes import exited
from common.settings import LocalSettings
from services.deploy_kubernetes.backends.base import (
    LaunchSpec,
    Lines,
    Notify,
    Observed,
    State,
    last_lines,
)
from services.deploy_kubernetes.backends.local.cgroups import (
    SLOT_RE,
    CgroupError,
    Cgroups,
    Group,
    Limits,
)
from services.deploy_kubernetes.backends.local.claims import Claims, slot_claim, uid_claim
from services.deploy_kubernetes.backends.local.folders import checked_id, private_dir
from services.deploy_kubernetes.backends.local.groups import (
    end_group,
    exit_reason,
    members,
    oom_killed,
    shim_of,
)
from services.deploy_kubernetes.backends.local.helper import (
    APP_HOME,
    Sizes,
    bwrap,
    bwrap_args,
    closed_to_others,
    installation,
    launch_request,
    reachable_by_others,
)
from services.deploy_kubernetes.backends.local.network import (
    Network,
    NetworkError,
    suite_network,
)
from services.deploy_kubernetes.backends.local.slots import Slot, SlotError, Slots
from services.deploy_kubernetes.backends.local.spawn import Child
from services.deploy_kubernetes.backends.local.state import suite_label
from services.deploy_kubernetes.backends.local.uids import Uids, parse_range, uids_in_use
from services.deploy_kubernetes.backends.readiness import OutputWatch, StartTimes, wait_http
from services.deploy_kubernetes.errors import BadBackendError, BinderError, LaunchError
from services.deploy_kubernetes.models import Template, cpu_cores, memory_bytes

PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
STOP_GRACE_SECONDS = 5.0
SWEEP_SECONDS = 5.0
"""How often apps another server ended are looked for (a stat of each ended app's cgroup)."""
DEFAULT_MEMORY = "512Mi"
"""The memory limit of a template that names none: a stranger's app is never unbounded."""


def suite_cgroups(state_dir: Path) -> Cgroups:
    """The cgroups of the suite whose local backend keeps its state in ``state_dir``."""
    return Cgroups.of_host(f"binder-{suite_label(state_dir)}")


def limits_of(template: Template) -> tuple[Limits, str]:
    """The cgroup limits of ``template``'s apps, and its memory limit as written."""
    memory = template.limits.get("memory") or DEFAULT_MEMORY
    cpu = template.limits.get("cpu")
    pids = template.pids
    millis = max(1, round(cpu_cores(cpu) * 1000)) if cpu else None
    return Limits(memory=memory_bytes(memory), pids=pids, cpu_millis=millis), memory


@dataclass
class App:
    """A sandboxed app this server knows: launched by it, or found again."""

    id: str
    slot: int
    uid: int
    target: str
    template: str | None
    memory: str
    group: Group
    shim: int | None
    child: Child | None = None
    """The shim as this server's child (None for an app of an earlier server)."""
    ended: str | None = None
    """Why it ended, once it has."""
    watch: anyio.CancelScope | None = None
    """The watch of its end, cancelled by a stop."""

    def observed(self) -> Observed:
        state = State.EXITED if self.ended else State.RUNNING
        ref = {"slot": self.slot, "uid": self.uid, "pid": self.shim, "template": self.template}
        return Observed(
            id=self.id,
            state=state,
            target=self.target,
            ref=ref,
            reason=self.ended,
            template=self.template,
        )


class SandboxedBackend:
    ready_at_target = True

    def __init__(
        self,
        *,
        state_dir: Path,
        log_dir: Path,
        settings: LocalSettings,
        home: Path | None = None,
        hidden: tuple[Path, ...] = (),
        python: str = sys.executable,
        record_delay: float = 0.0,
    ) -> None:
        if os.geteuid() != 0:
            raise ConfigError(
                "deploy.local.sandbox: sandboxed apps need a deploy server running as root; "
                "run it as root, or set [deploy.local] sandbox = false (trusted templates only)"
            )
        self._state = state_dir
        self._log_dir = log_dir
        self._home = home
        self._python = python
        self._record_delay = record_delay
        self._log_max = settings.log_max_bytes
        self.suite = suite_label(state_dir)
        network = (
            suite_network(self.suite)
            if not settings.sandbox_network
            else _network_setting(settings.sandbox_network)
        )
        self._cgroups = Cgroups.of_host(f"binder-{self.suite}")
        self._network = Network(f"b{self.suite[:6]}", network)
        self._claims = Claims(state_dir / "claims")
        # each deploy server of the suite starts its search elsewhere in the range
        self._uids = Uids(
            parse_range(settings.uid_range),
            f"{self.suite}:{os.getpid()}",
            claims=self._claims,
            unused=self._uid_unused,
        )
        self._slots = Slots(
            cgroups=self._cgroups,
            network=self._network,
            uids=self._uids,
            size=settings.sandbox_slots,
            claims=self._claims,
        )
        self._hidden = [p for p in (home, state_dir, log_dir, *hidden) if p is not None]
        self._apps: dict[str, App] = {}
        self._stopping: set[str] = set()
        self._making = anyio.CapacityLimiter(1)
        """Slots made on launches' paths, one at a time (:meth:`_slot`)."""
        self._starts = StartTimes()
        self._output = OutputWatch()
        self._background = LoopSupervisor()
        self._notify: Notify | None = None
        self.api_calls: dict[str, int] = {}

    # --- start and end of the server -------------------------------------------------------

    async def open(self, notify: Notify) -> None:
        for folder in (self._state, self._log_dir):
            private_dir(folder, 0o700)
        if self._home is not None:
            private_dir(self._home, 0o700)
        # refused now, naming the fix, when it is missing; the words are the same for every app
        self._slots.sandbox = [
            bwrap(),
            *bwrap_args(
                hidden=self._hidden,
                sizes=Sizes(),
                reachable=reachable_by_others,
                shown=installation(),
            ),
        ]
        self._slots.reach = closed_to_others(installation())
        try:
            await anyio.to_thread.run_sync(self._prepare)
        except (CgroupError, NetworkError, OSError) as exc:
            raise ConfigError(
                f"deploy.local.sandbox: the sandbox cannot be made here: {exc}"
            ) from exc
        for app in self._apps.values():
            self._watch(app)
        self._notify = notify

    def _prepare(self) -> None:
        self._cgroups.prepare()
        self._network.prepare()
        self._claims.prepare()
        self._recover()

    def _recover(self) -> None:
        """Find the apps of the suite (see the module's docstring); drop the parked slots of
        dead servers (their helpers ended with them: their stdin's writer is gone) and every
        namespace, record and claim that belongs to no app. A slot whose claim another live
        deploy server holds (parked, or being made: a cgroup with no process yet) is its."""
        self._claims.abandoned()  # the claims of dead servers: settled below

        def making(name: str) -> bool:  # a slot another live server is making
            found = SLOT_RE.match(name)
            return found is not None and not self._slots.holds_claim(int(found.group(1)))

        # made or claimed half-way by a killed server: removed once no process is in them
        for group in self._cgroups.remove_partial(keep=making):
            logger.info("a half-made cgroup left for later: {}", group.paths())
        inodes = {inode: n for n, inode in self._network.existing().items()}
        used: set[int] = set()
        keep: set[str] = set()
        for n in self._cgroups.unclaimed():
            if not self._slots.holds_claim(n):
                used.add(n)  # another live server's
                continue
            slot = self._cgroups.slot(n)
            if slot.procs():  # a helper still in it: left alone
                used.add(n)
                keep.add(slot_claim(n))
                self._slots.hold_number(n)
                continue
            with contextlib.suppress(OSError):
                slot.remove()
        for dep_id, group in self._cgroups.apps().items():
            app = self._found(dep_id, group, inodes)
            self._apps[dep_id] = app
            used.add(app.slot)
            self._slots.hold_number(app.slot)
            keep.add(slot_claim(app.slot))
            if app.uid >= 0:
                self._uids.hold(app.uid)
                keep.add(uid_claim(app.uid))
        for n in set(self._network.existing()) - used:
            if self._slots.holds_claim(n):
                self._network.remove(self._network.netns(n), link=True)
        for path in self._state.glob("*.json"):
            if path.stem not in self._apps:
                self._forget(path.stem)
        for name in self._claims.held() - keep:
            self._claims.release(name)

    def _uid_unused(self, uid: int) -> bool:
        """Whether ``uid``, claimed by a server that died, is no process's and no app's of the
        suite (a launched app's record names its uid before its processes take it)."""
        if uid in uids_in_use(self._uids.range):
            return False
        return all(self._record(p.stem).get("uid") != uid for p in self._state.glob("*.json"))

    def _found(self, dep_id: str, group: Group, inodes: dict[int, int]) -> App:
        record = self._record(dep_id)
        seen = members(group)
        uid = next((u for u, _ in seen.values() if u in self._uids.range), record.get("uid", -1))
        found = next((inodes[i] for _, i in seen.values() if i in inodes), None)
        # no process left in it: the record (root's) tells the slot
        slot: int = found if found is not None else _number(record.get("slot"), -1)
        port = _number(record.get("port"), 0)
        target = f"http://{self._network.netns(slot).app_addr}:{port}" if slot >= 0 else ""
        app = App(
            id=dep_id,
            slot=slot,
            uid=uid if isinstance(uid, int) else -1,
            target=target,
            template=record.get("template") if isinstance(record.get("template"), str) else None,
            memory=str(record.get("memory") or DEFAULT_MEMORY),
            group=group,
            shim=shim_of(group),
        )
        if not seen:
            app.ended = self._reason(app)
        logger.bind(id=dep_id).info("found app in slot {} (uid {})", slot, app.uid)
        return app

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {
            "sandbox slots": self._slots.run,
            "app output": self._output.run,
            "sandbox sweep": self._sweep_loop,
        }

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(SWEEP_SECONDS)
            await self.sweep()

    async def sweep(self) -> None:
        """Finish the apps another deploy server ended (their cgroup and record gone): this
        server's namespace, slot number and uid of each (see the module's docstring)."""
        ended = [app for app in self._apps.values() if app.ended is not None]
        if not ended:
            return
        groups = await anyio.to_thread.run_sync(self._cgroups.apps)
        for app in ended:
            if (
                app.id not in self._stopping
                and app.id not in groups
                and not self._record_path(app.id).exists()
            ):
                await anyio.to_thread.run_sync(self._finish, app)

    async def close(self) -> None:
        """Drop the parked slots; the apps run on (and the host's rules that keep them apart:
        another deploy server of the suite may be launching), their claims left for the server
        that finds them."""
        await self._background.cancel_all()
        self._output.close()
        await anyio.to_thread.run_sync(self._slots.close)
        self._claims.close()

    async def retire(self) -> bool:
        """Once the suite stops (``stop-all``, every deploy server stopped and every app ended):
        remove the host's side of the sandbox (the nft table, the gateway address and the
        blackhole route, the cgroup parents), unless some app or parked slot is still there.
        True when it was removed."""
        if self._cgroups.apps() or self._cgroups.unclaimed() or self._cgroups.remove_partial():
            return False
        await anyio.to_thread.run_sync(self._network.drop_host_side)
        await anyio.to_thread.run_sync(self._cgroups.remove_parents)
        return True

    async def ping(self) -> None:
        return None

    # --- files of the suite's own ----------------------------------------------------------

    def _log_path(self, dep_id: str) -> Path:
        return self._log_dir / f"{checked_id(dep_id)}.log"

    def _status_path(self, dep_id: str) -> Path:
        return self._state / f"{checked_id(dep_id)}.status"

    def _record_path(self, dep_id: str) -> Path:
        return self._state / f"{checked_id(dep_id)}.json"

    def _write_record(self, dep_id: str, record: dict[str, Any]) -> None:
        path = self._record_path(dep_id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(record))
        tmp.replace(path)

    def _record(self, dep_id: str) -> dict[str, Any]:
        try:
            data = json.loads(self._record_path(dep_id).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _forget(self, dep_id: str) -> None:
        for path in (self._record_path(dep_id), self._status_path(dep_id)):
            path.unlink(missing_ok=True)

    # --- launch ------------------------------------------------------------------------------

    def _environment(self, spec: LaunchSpec) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update({"HOME": APP_HOME, "USER": "app", "LOGNAME": "app"})
        env.update(spec.environment(port=spec.template.port, python=self._python))
        env.update({"BINDER_TEMPLATE": spec.template.name, "PYTHONUNBUFFERED": "1"})
        return env

    async def launch(self, spec: LaunchSpec) -> Observed:
        template = spec.template
        port = template.port
        argv = [spec.substitute(w, port=port, python=self._python) for w in template.command]
        env = self._environment(spec)
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            raise LaunchError(f"could not start {argv[0]!r}: no such program")
        try:
            limits, memory = limits_of(template)
        except (ValueError, BinderError) as exc:
            raise LaunchError(f"bad limits: {exc}") from exc
        if spec.id in self._apps:
            raise LaunchError(f"{spec.id} runs already")
        if not spec.pooled:  # no refill meanwhile; a pool's start waits for no one
            self._slots.starting(spec.id, started=True)
        try:
            slot = await self._slot()
        except BaseException:
            self._slots.starting(spec.id, started=False)
            raise
        try:
            app = self._start(spec, slot, argv, env, limits, memory)
        except BaseException as exc:
            self._slots.starting(spec.id, started=False)
            await anyio.to_thread.run_sync(self._undo, spec.id, slot)
            if isinstance(exc, OSError | CgroupError):
                raise LaunchError(f"could not start the app's sandbox: {exc}") from exc
            raise
        self._watch(app)
        if self._record_delay:
            await anyio.sleep(self._record_delay)
        logger.bind(id=spec.id, template=template.name).info(
            "started in slot {} (uid {}) at {}", slot.n, slot.uid, app.target
        )
        return Observed(
            id=spec.id,
            state=State.STARTING,
            target=app.target,
            ref=app.observed().ref,
            template=template.name,
        )

    async def _slot(self) -> Slot:
        """A parked slot, or one made now (the pool ran dry: this launch pays ~20 ms).

        Slots made on launches' paths are made one at a time: each is mostly netlink work in
        the server (Python, under the GIL) and the kernel's making of a network namespace, and
        forty made at once in a burst of 50 spent much of their CPU in the kernel, handing the
        GIL round (futex waits and wakes, scheduling): the server's CPU per launch was 35-65 ms
        against 20-25 ms one at a time, and the burst was all deployed 0.3-0.9 s sooner one at
        a time (three bursts of 50 each way, measured)."""
        slot = self._slots.take()
        if slot is not None:
            return slot
        making = asyncio.ensure_future(
            anyio.to_thread.run_sync(self._slots.make, limiter=self._making)
        )
        try:
            return await asyncio.shield(making)
        except asyncio.CancelledError:  # the slot made meanwhile is not left behind
            await asyncio.wait({making})
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(self._slots.drop, making.result())
            raise
        except (SlotError, NetworkError, CgroupError, OSError, ConfigError) as exc:
            raise LaunchError(f"could not make the app's sandbox: {exc}") from exc

    def _start(
        self,
        spec: LaunchSpec,
        slot: Slot,
        argv: list[str],
        env: dict[str, str],
        limits: Limits,
        memory: str,
    ) -> App:
        """The launch proper (~0.3 ms, no await): the record, the claim of the slot's cgroup for
        the id, the limits, the request to the parked helper."""
        target = f"http://{slot.netns.app_addr}:{spec.template.port}"
        record = {
            "slot": slot.n,
            "uid": slot.uid,
            "port": spec.template.port,
            "template": spec.template.name,
            "memory": memory,
        }
        self._write_record(spec.id, record)  # before the claim: a found app has its record
        group = self._cgroups.claim(slot.n, spec.id)
        group.set_limits(limits)
        request = launch_request(
            log=self._log_path(spec.id),
            log_max=self._log_max,
            status=self._status_path(spec.id),
            argv=argv,
            env=env,
        )
        view = memoryview(request)
        while view:
            view = view[os.write(slot.request, view) :]
        os.close(slot.request)
        app = App(
            id=spec.id,
            slot=slot.n,
            uid=slot.uid,
            target=target,
            template=spec.template.name,
            memory=memory,
            group=group,
            shim=slot.helper.pid,
            child=slot.helper,
        )
        self._apps[spec.id] = app
        return app

    def _undo(self, dep_id: str, slot: Slot) -> None:
        """A launch that failed half-way: its slot (helper, cgroup claimed or not, namespace,
        uid) and its record go."""
        self._slots.drop(slot)
        claimed = self._cgroups.apps().get(dep_id)
        if claimed is not None:
            claimed.signal(signal.SIGKILL)
            with contextlib.suppress(OSError):
                claimed.remove()
        self._apps.pop(dep_id, None)
        self._forget(dep_id)

    # --- the end of an app -------------------------------------------------------------------

    def _watch(self, app: App) -> None:
        if app.ended is None:
            self._background.spawn(self._watch_app(app))

    async def _watch_app(self, app: App) -> None:
        """Wait for the app's end (its shim's exit) or an OOM kill in its group (which ends the
        whole group: v1 kills only the process it chose); then say why it ended."""
        app.watch = anyio.CancelScope()
        with app.watch:
            async with anyio.create_task_group() as tasks:

                async def on_oom() -> None:
                    await oom_killed(app.group)
                    logger.bind(id=app.id).warning("out of memory: ending the whole app")
                    await end_group(app.group, app.shim, grace=0)

                async def on_exit() -> None:
                    await self._shim_exit(app)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(on_oom)
                tasks.start_soon(on_exit)
        if app.ended is not None or app.id in self._stopping:
            return
        app.ended = self._reason(app)
        if self._notify is not None:
            await self._notify(app.observed())

    async def _shim_exit(self, app: App) -> None:
        if app.child is not None:
            await exited(app.child.pid)
            app.child.wait()
            return
        if app.shim is not None:
            await exited(app.shim)
        # the shim was killed before the rest (or there was none): v1 tells of no emptiness
        while app.group.procs():  # noqa: ASYNC110
            await anyio.sleep(1.0)

    def _reason(self, app: App) -> str:
        code = app.child.returncode if app.child is not None else None
        return exit_reason(
            group=app.group,
            memory=app.memory,
            status_file=self._status_path(app.id),
            shim_code=code,
        )

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        async def alive() -> str | None:
            app = self._apps.get(spec.id)
            if app is None:
                return "the app was stopped"
            if app.ended is None and app.child is not None and app.child.poll() is not None:
                app.ended = self._reason(app)
            return app.ended

        assert observed.target is not None
        try:
            with self._output.hints(self._log_path(spec.id)) as hints:
                await wait_http(
                    observed.target + spec.ready_path,
                    deadline=deadline,
                    alive=alive,
                    starts=self._starts,
                    template=spec.template.name,
                    hints=hints,
                )
        finally:
            self._slots.starting(spec.id, started=False)
        return observed.running()

    async def output(self, dep_id: str, *, lines: int) -> Lines:
        return await anyio.to_thread.run_sync(last_lines, self._log_path(dep_id), lines)

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        """End the app's whole group, then remove its cgroup, namespace, record and status, and
        give back its uid and slot number. Stopping what is gone is no error."""
        checked_id(dep_id)
        self._stopping.add(dep_id)
        self._slots.starting(dep_id, started=False)
        try:
            await self._stop(dep_id)
        except (OSError, CgroupError) as exc:
            raise BadBackendError(f"could not end the app's sandbox: {exc}") from exc
        finally:
            self._stopping.discard(dep_id)

    async def _stop(self, dep_id: str) -> None:
        app = self._apps.get(dep_id)
        # looked up afresh: another server may have ended it, and (cgroup v2) made its slot anew
        group = self._cgroups.apps().get(dep_id)
        if app is None and group is not None:  # another server's, launched since this one began
            inodes = {inode: n for n, inode in self._network.existing().items()}
            app = self._found(dep_id, group, inodes)
        if group is not None:
            shim = app.shim if app is not None else shim_of(group)
            await end_group(group, shim, grace=STOP_GRACE_SECONDS)
            if app is not None:
                if app.watch is not None:
                    app.watch.cancel()
                if app.child is not None:
                    with anyio.move_on_after(2.0):
                        await exited(app.child.pid)
                    app.child.poll()
            await anyio.to_thread.run_sync(group.remove)
        if app is not None:
            self._finish(app)
        self._forget(dep_id)

    def _finish(self, app: App) -> None:
        """Give back what ended ``app`` held: its namespace (only by the holder of its slot's
        claim: another server may have made the slot anew), slot number and uid."""
        if app.slot >= 0:
            if self._slots.holds_claim(app.slot):
                self._network.remove(self._network.netns(app.slot))
            self._slots.release_number(app.slot)
        if app.uid >= 0:
            self._uids.free(app.uid)
        self._apps.pop(app.id, None)

    async def list(self) -> list[Observed]:
        for dep_id, group in self._cgroups.apps().items():
            if dep_id not in self._apps and dep_id not in self._stopping:
                inodes = {inode: n for n, inode in self._network.existing().items()}
                app = self._found(dep_id, group, inodes)
                self._apps[dep_id] = app
                self._watch(app)
        return [app.observed() for app in self._apps.values()]

    async def preload(self, template: Template) -> None:
        return None

    async def preload_status(self, template: Template) -> str:
        return "completed"

    def running_slots(self) -> int:
        return self._slots.ready()


def _number(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _network_setting(text: str) -> Any:
    import ipaddress

    try:
        network = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise ConfigError(f"deploy.local.sandbox_network: {text!r} is not an IPv4 network") from exc
    if network.prefixlen > 28:
        raise ConfigError(f"deploy.local.sandbox_network: {text!r} is smaller than a /28")
    return network
