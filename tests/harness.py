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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHP = ROOT / ".node" / "node_modules" / ".bin" / "configurable-http-proxy"
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
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError, *ignore) as exc:
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

    def __init__(self, workdir: Path, *, auth: bool = True) -> None:
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
            [*argv, "--auth"] if auth else argv,
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

    def __init__(self, workdir: Path) -> None:
        if not CHP.exists():
            raise RuntimeError("configurable-http-proxy is missing: run `make setup`")
        self.port, self.api_port = free_port(), free_port()
        self.token = secrets.token_hex(16)
        env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": self.token}
        self.proc = Proc(
            [
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
        **deploy: Any,
    ) -> None:
        """``deploy`` options go to ``[deploy]``; ``sections`` adds other tables
        (``{"http": {"header_timeout_seconds": 1}}``)."""
        self.workdir, self.db, self.proxy = workdir, db, proxy
        self.port = free_port()
        self.api_key = secrets.token_hex(16)
        self.logging_token = secrets.token_hex(16)
        self.home = workdir / "home"
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

    def app_pids(self) -> dict[str, int]:
        """Deployment id -> pid of the local backend's running apps (from its pid files)."""
        import json

        out = {}
        for path in (self.home / "run" / "local").glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                out[path.stem] = int(json.loads(path.read_text())["pid"])
        return out


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
