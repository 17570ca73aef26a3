"""Real components for integration tests: the database server, the proxy, the suite's services,
each started as its own process on free ports, awaited with a deadline and stopped cleanly."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
from pymongo import MongoClient

from common.settings import Settings, load_settings
from services.deploy_kubernetes.backends.local.groups import shim_of
from services.deploy_kubernetes.backends.local.sandboxed import SandboxedBackend, suite_cgroups

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHP = ROOT / ".node" / "node_modules" / ".bin" / "configurable-http-proxy"
PROXY_EDGE = ROOT / "services" / "proxy_edge.js"
EXAMPLE_COMMAND = (
    "{python}",
    "-m",
    "services.example_app",
    "--port",
    "{port}",
    "--base-url",
    "{base_url}",
)
"""The `example` template's command, for tests that register templates of their own."""
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Debian's chromium, headless as root, with nothing that reaches out of this host."""


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free on loopback now, never one this process was given before: the kernel may
    hand the same free port to two calls in a row, and a suite given the same port for two of
    its services refuses to start."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_for(
    check: Callable[[], Any],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
    ignore: tuple[type[Exception], ...] = (),
) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds.

    Connection errors, and the exceptions in ``ignore``, count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    passed: tuple[type[Exception], ...] = (httpx.HTTPError, OSError, *ignore)
    while time.monotonic() < deadline:
        try:
            last = check()
        except passed as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class Proc:
    """A child process with its output in a file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(
        self,
        argv: list[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv, self.log_path, self.env, self.cwd = argv, log, env, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Database:
    """The suite's ``db`` program (``python -m services.embedded_db``: durable commits) on a free
    port, requiring authentication as the suite runs it (``auth=False`` for an open one), with
    the faults the tests inject: kill -9, freeze and thaw."""

    USER = "binder"

    def __init__(self, workdir: Path, *, auth: bool = True, options: tuple[str, ...] = ()) -> None:
        """``options`` are added to the server's command line (``--auth-deadline 1``)."""
        self.port = free_port()
        self.dir = workdir / "db"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = secrets.token_hex(12) if auth else ""
        argv = [
            sys.executable,
            "-m",
            "services.embedded_db",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            str(self.dir),
        ]
        self.proc = Proc(
            [*argv, "--auth", *options] if auth else [*argv, *options],
            log=workdir / "db.log",
            env={**os.environ, "BINDER_DB_URI": self.uri},  # the credentials: never in argv
            cwd=ROOT,
        )

    @property
    def anonymous_uri(self) -> str:
        """The server's address without credentials."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def uri(self) -> str:
        """The address with the credentials (when the server requires them)."""
        if not self.password:
            return self.anonymous_uri
        return (
            f"mongodb://{self.USER}:{self.password}@127.0.0.1:{self.port}/"
            "?directConnection=true&authSource=admin"
        )

    def start(self) -> Database:
        self.proc.start()
        wait_for(lambda: port_open(self.port), what="the database server")
        return self

    def stop(self) -> None:
        self.proc.stop()

    def kill9(self) -> None:
        self.proc.kill9()

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


class Proxy:
    """configurable-http-proxy with its token in the environment, on free ports."""

    def __init__(self, workdir: Path, *, edge: dict[str, str] | None = None) -> None:
        """``edge`` overrides the bounds of ``services/proxy_edge.js`` (``CHP_EDGE_*``)."""
        if not CHP.exists():
            raise RuntimeError("configurable-http-proxy is missing: run `make setup`")
        self.port, self.api_port = free_port(), free_port()
        self.token = secrets.token_hex(16)
        bounds = {  # the suite's defaults (control.services.proxy_edge_env)
            "CHP_EDGE_PUBLIC_PORT": str(self.port),
            "CHP_EDGE_PER_CLIENT": "200",
            "CHP_EDGE_HEADER_TIMEOUT_MS": "10000",
            "CHP_EDGE_MAX_HEADERS": "100",
            **(edge or {}),
        }
        env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": self.token, **bounds}
        self.proc = Proc(
            [
                "node",
                "--require",  # as the suite runs it (control.services)
                str(PROXY_EDGE),
                str(CHP),
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--api-ip",
                "127.0.0.1",
                "--api-port",
                str(self.api_port),
            ],
            log=workdir / "proxy.log",
            env=env,
        )
        self._argv = list(self.proc.argv)

    def front(self, deploy_url: str) -> None:
        """Send what no route takes to the deploy server at ``deploy_url``, as the suite's proxy
        does (its pages, and the ended page of a gone session), and ask it for the error page
        of an app that does not answer; takes effect at the next start."""
        self.proc.argv = [
            *self._argv,
            "--default-target",
            deploy_url,
            "--error-target",
            f"{deploy_url}/ended",
        ]

    def start(self) -> Proxy:
        self.proc.start()
        wait_for(lambda: self.routes() is not None, what="the proxy API")
        return self

    def stop(self) -> None:
        self.proc.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def routes(self) -> dict[str, Any]:
        response = httpx.get(
            f"http://127.0.0.1:{self.api_port}/api/routes",
            headers={"Authorization": f"token {self.token}"},
            timeout=2,
        )
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)


class DeployServer:
    """The deploy server as a real process (``python -m services.deploy_kubernetes``)."""

    def __init__(
        self,
        workdir: Path,
        db: Database,
        proxy: Proxy,
        *,
        sections: dict[str, dict[str, Any]] | None = None,
        environ: dict[str, str] | None = None,
        home: Path | None = None,
        **deploy: Any,
    ) -> None:
        """``deploy`` options go to ``[deploy]``; ``sections`` adds other tables
        (``{"http": {"header_timeout_seconds": 1}}``); ``environ`` is added to the server's
        environment (the entry point's test hooks); ``home`` is another server's home, for two
        servers of one host (they share its apps' state)."""
        self.workdir, self.db, self.proxy = workdir, db, proxy
        self.port = free_port()
        self.api_key = secrets.token_hex(16)
        self.logging_token = secrets.token_hex(16)
        self.home = home or workdir / "home"
        self.config = workdir / "deploy.toml"
        options = {"port": self.port, "host": "127.0.0.1", **deploy}
        lines = [
            "[db]",
            f"uri = {db.uri!r}".replace("'", '"'),
            "[proxy]",
            f"port = {proxy.port}",
            f"api_port = {proxy.api_port}",
            f'public_host = "127.0.0.1:{proxy.port}"',
            'ip = "127.0.0.1"',
            "[logging]",
            f"port = {free_port()}",
            "[deploy]",
            *(f"{k} = {_toml(v)}" for k, v in options.items()),
        ]
        for name, table in (sections or {}).items():
            lines += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: Proc | None = None
        self._client: httpx.Client | None = None
        self.environ = environ or {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> DeployServer:
        env = {
            **os.environ,
            "BINDER_API_KEY": self.api_key,
            "CONFIGPROXY_AUTH_TOKEN": self.proxy.token,
            "BINDER_LOGGING_TOKEN": self.logging_token,
            "BINDER_HOME": str(self.home),
            **self.environ,
        }
        self.proc = Proc(
            [sys.executable, "-m", "services.deploy_kubernetes", "--config", str(self.config)],
            log=self.workdir / "deploy.log",
            env=env,
            cwd=ROOT,
        )
        self.proc.start()
        if wait:
            wait_for(
                lambda: httpx.get(self.url + "/health", timeout=2).status_code == 200,
                timeout=30,
                what="the deploy server's /health",
            )
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            self.proc.stop()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill9()

    def metric(self, name: str) -> float | None:
        """A sample of /metrics (``name`` with its labels, as printed), None when absent."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def leads(self) -> bool:
        return self.metric('binder_lease_held{lease="leader"}') == 1

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": self.api_key}

    def client(self) -> httpx.Client:
        """A client of the API, closed when the server is stopped."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=10)
        return self._client

    def launch(self, template: str = "example", **body: Any) -> str:
        response = httpx.post(f"{self.url}/applications/{template}", json=body or None, timeout=10)
        assert response.status_code == 200, response.text
        dep_id: str = response.json()["id"]
        return dep_id

    def status(self, dep_id: str, template: str = "example") -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(
            f"{self.url}/applications/{template}/{dep_id}", timeout=10
        ).json()
        return data

    def wait_status(
        self, dep_id: str, *statuses: str, timeout: float = 30.0, template: str = "example"
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            data = self.status(dep_id, template)
            return data if data.get("status") in statuses else None

        result: dict[str, Any] = wait_for(check, timeout=timeout, what=f"{dep_id} to be {statuses}")
        return result

    def settings(self) -> Settings:
        return load_settings(self.config, home=self.home, environ={})

    def app_pids(self) -> dict[str, int]:
        """Deployment id -> pid of the local backend's running apps: for sandboxed apps their
        shim (the one root process of their cgroup), else the pid of their pid file."""
        import json

        if self.settings().deploy.local.sandbox:
            cgroups = suite_cgroups(self.home / "run" / "local")
            found = {dep_id: shim_of(group) for dep_id, group in cgroups.apps().items()}
            return {dep_id: pid for dep_id, pid in found.items() if pid is not None}
        out = {}
        for path in (self.home / "run" / "local").glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                out[path.stem] = int(json.loads(path.read_text())["pid"])
        return out

    def app_processes(self, dep_id: str) -> list[int]:
        """Every process of a sandboxed app (its cgroup's), its shim included."""
        group = suite_cgroups(self.home / "run" / "local").apps().get(dep_id)
        return group.procs() if group is not None else []

    def kill_app(self, dep_id: str, sig: int = signal.SIGKILL) -> None:
        """The app dies by ``sig``: every process of its sandbox but its shim (the suite's),
        or its process group when it is not sandboxed."""
        if not self.settings().deploy.local.sandbox:
            os.killpg(self.app_pids()[dep_id], sig)
            return
        group = suite_cgroups(self.home / "run" / "local").apps()[dep_id]
        group.signal(sig, spare=shim_of(group))

    def remove_apps(self) -> None:
        """End every app the server left running, leaving nothing of them on the host (the
        server itself is stopped)."""
        settings = self.settings()
        if settings.deploy.backend != "local":
            return
        if not settings.deploy.local.sandbox:
            for pid in self.app_pids().values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            return
        from services.deploy_kubernetes.app import build_backend

        async def stop_all() -> None:
            async def ignore(_: object) -> None:
                return None

            backend = build_backend(settings)
            assert isinstance(backend, SandboxedBackend)
            await backend.open(ignore)
            try:
                for obs in await backend.list():
                    await backend.stop(obs.id, obs.ref)
            finally:
                await backend.close()
            await backend.retire()

        # in a thread of its own: the caller may be running an event loop (the pages' tests)
        done = threading.Thread(target=anyio.run, args=(stop_all,))
        done.start()
        done.join()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


class LoggingServer:
    """The log aggregator as a real process (``python -m services.logging``)."""

    def __init__(self, workdir: Path, db: Database, **logging: Any) -> None:
        self.workdir, self.db = workdir, db
        self.port = free_port()
        self.home = workdir / "home"
        (self.home / "logs" / "apps").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "logging.toml"
        self.token = secrets.token_hex(16)
        options = {"port": self.port, **logging}
        self.database = f"logs{secrets.token_hex(4)}"
        """The aggregator's database (a name of its own on ``db``)."""
        self.config.write_text(
            f'[db]\nuri = "{db.uri}"\ndatabase = "{self.database}"\n[logging]\n'
            + "".join(f"{k} = {_toml(v)}\n" for k, v in options.items())
        )
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> LoggingServer:
        env = {**os.environ, "BINDER_HOME": str(self.home), "BINDER_LOGGING_TOKEN": self.token}
        self.proc = Proc(
            [sys.executable, "-m", "services.logging", "--config", str(self.config)],
            log=self.workdir / "logging.log",
            env=env,
            cwd=ROOT,
        ).start()
        wait_for(
            lambda: httpx.get(self.url + "/health", timeout=2).status_code == 200,
            timeout=30,
            what="the log aggregator's /health",
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill9()

    def query(self, **params: Any) -> dict[str, Any]:
        response = httpx.get(self.url + "/logs", params=params, headers=self.auth, timeout=30)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def all(self, **params: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        params = {"limit": 1000, **params}
        while True:
            page = self.query(**params)
            out += page["records"]
            if not page["next"]:
                return out
            params["cursor"] = page["next"]


def seed_history(uri: str, database: str, *, count: int, start: datetime) -> None:
    """``count`` ended records, one every 30 s from ``start``, numbered as the store numbers
    the records that end (their history's order), into a database whose indexes the store
    made first (as a server's months of history are written)."""

    async def indexes() -> None:
        from services.deploy_kubernetes.store.mongo import MongoStore

        store = MongoStore(uri=uri, database=database)
        try:
            await store.open()
        finally:
            await store.close()

    anyio.run(indexes)
    with MongoClient[dict[str, Any]](uri) as client:
        db = client[database]
        batch: list[dict[str, Any]] = []
        numbers: dict[str, int] = {}
        for n in range(1, count + 1):
            created = start + n * HISTORY_STEP
            template = "example" if n % 5 else "other"
            numbers[template] = numbers.get(template, 0) + 1
            batch.append(
                {
                    "id": f"{n:032x}",
                    "template": template,
                    "status": "failed" if n % 7 == 0 else "deleted",
                    "created": created,
                    "ended_at": created + timedelta(minutes=5),
                    "cull_timeout_ms": 3_600_000,
                    "location": f"h/user/{n:032x}",
                    "url": f"http://h/user/{n:032x}/",
                    "reason": "deleted by request",
                    "pooled": False,
                    "backend_ref": {},
                    "client": "192.0.2.1",
                    "ended_seq": n,
                    "template_seq": f"{template}/{numbers[template]:012d}",
                }
            )
            if len(batch) == 10_000 or n == count:
                db["deployments"].insert_many(batch)
                batch = []
        statuses = {"failed": count // 7, "deleted": count - count // 7}
        counters = [{"_id": "ended", "n": count}]
        counters += [{"_id": f"ended:{t}", "n": n} for t, n in numbers.items()]
        counters += [{"_id": f"ended-status:{s}", "n": n} for s, n in statuses.items()]
        for doc in counters:
            db["counters"].replace_one({"_id": doc["_id"]}, doc, upsert=True)


HISTORY_STEP = timedelta(seconds=30)
