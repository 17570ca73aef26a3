"""binder-control with the real supervisord and the four real services on a temporary home."""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import free_port, port_open, wait_for
from pymongo import MongoClient
from pymongo.errors import OperationFailure
from squatter import NOBODY, Squatter

from common.processes import alive

BIN = Path(sys.executable).parent / "binder-control"
SECRET_FILES = ("proxy-token", "logging-token", "db-password")


class Control:
    def __init__(self, home: Path, config: Path) -> None:
        self.home, self.config = home, config
        self.ports = {k: free_port() for k in ("db", "proxy", "proxy_api", "logging", "deploy")}
        config.write_text(
            f"[db]\nport = {self.ports['db']}\n"
            f"[proxy]\nport = {self.ports['proxy']}\napi_port = {self.ports['proxy_api']}\n"
            f'ip = "127.0.0.1"\npublic_host = "127.0.0.1:{self.ports["proxy"]}"\n'
            f"[logging]\nport = {self.ports['logging']}\n"
            f'[deploy]\nport = {self.ports["deploy"]}\nhost = "127.0.0.1"\n'
        )

    def run(
        self,
        *args: str,
        check: bool = False,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN), "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def status(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.run("status", "--json").stdout)
        return {r["service"]: r for r in rows}

    @property
    def api_key(self) -> str:
        return (self.home / "api-key").read_text().strip()

    def secrets(self) -> dict[str, str]:
        """What the services run with: ``<home>/secrets.env``."""
        lines = (self.home / "secrets.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def secret_values(self) -> list[str]:
        """Every secret as it could leak: the key, the tokens, the database password."""
        return [self.api_key] + [(self.home / n).read_text().strip() for n in SECRET_FILES]

    def post_log(self, records: list[dict[str, Any]]) -> httpx.Response:
        token = self.secrets()["BINDER_LOGGING_TOKEN"]
        return httpx.post(
            f"http://127.0.0.1:{self.ports['logging']}/logs",
            json=records,
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )

    @property
    def deploy_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['deploy']}"

    def launch(self) -> str:
        dep_id: str = httpx.post(f"{self.deploy_url}/applications/example", timeout=10).json()["id"]
        wait_for(lambda: self.dep(dep_id)["status"] == "deployed", timeout=30, what="deployed")
        return dep_id

    def dep(self, dep_id: str) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(
            f"{self.deploy_url}/applications/example/{dep_id}", timeout=10
        ).json()
        return data

    def through_proxy(self, dep_id: str) -> int:
        return httpx.get(
            f"http://127.0.0.1:{self.ports['proxy']}/user/{dep_id}/", timeout=5
        ).status_code


def _suite_pids(home: Path) -> list[int]:
    """Processes whose command line or environment mentions the suite's home."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(home).encode() in blob and alive(int(proc.name)):
            out.append(int(proc.name))
    return out


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    base = tmp_path_factory.mktemp("control")
    c = Control(base / "home", base / "binder.toml")
    c.run("start-all", "--config", str(c.config), check=True)
    yield c
    c.run("stop-all")


def test_start_all_brings_every_service_up_and_ready(control: Control) -> None:
    rows = control.status()
    assert list(rows) == ["db", "logging", "proxy", "deploy-kubernetes"]
    assert all(r["state"] == "RUNNING" and r["ready"] for r in rows.values()), rows
    assert control.run("status").returncode == 0
    assert (control.home / "api-key").stat().st_mode & 0o777 == 0o600
    assert (control.home / "supervisor.sock").stat().st_mode & 0o077 == 0


def test_second_start_all_changes_nothing_and_prints_no_key_to_a_file(
    control: Control, tmp_path: Path
) -> None:
    before = {k: v["pid"] for k, v in control.status().items()}
    output = tmp_path / "start-all.out"
    with output.open("w") as fh:
        subprocess.run(
            [str(BIN), "--home", str(control.home), "start-all", "--config", str(control.config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=120,
        )
    text = output.read_text()
    assert "binder-control api-key" in text, text
    assert not [s for s in control.secret_values() if s in text]
    assert {k: v["pid"] for k, v in control.status().items()} == before


def test_changed_config_restarts_only_the_services_that_read_it(control: Control) -> None:
    before = {k: v["pid"] for k, v in control.status().items()}
    changed = control.config.parent / "changed.toml"
    changed.write_text(
        control.config.read_text().replace("[deploy]\n", "[deploy]\nmax_deployments = 77\n")
    )
    control.run("start-all", "--config", str(changed), check=True)
    after = {k: v["pid"] for k, v in control.status().items()}
    assert after["deploy-kubernetes"] != before["deploy-kubernetes"]
    assert {k: after[k] for k in ("db", "logging", "proxy")} == {
        k: before[k] for k in ("db", "logging", "proxy")
    }
    assert "max_deployments = 77" in control.run("config", check=True).stdout


def test_logs_follow_prints_history_then_new_lines(control: Control) -> None:
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    assert control.post_log(
        [
            {"service": "ops", "message": "too old", "time": old},
            {"service": "ops", "message": "history 1"},
            {"service": "ops", "message": "history 2"},
        ]
    ).is_success
    argv = [
        str(BIN),
        "logs",
        "--follow",
        "--json",
        "ops",
        "--since",
        "1h",
        "--home",
        str(control.home),
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as follower:
        assert follower.stdout is not None
        try:
            assert json.loads(follower.stdout.readline())["message"] == "history 1"
            assert json.loads(follower.stdout.readline())["message"] == "history 2"
            deadline = time.monotonic() + 20
            line = ""
            while not line:  # post until the follower, once subscribed, prints the line
                assert time.monotonic() < deadline, "logs --follow printed no new line"
                control.post_log([{"service": "ops", "message": "hello follower"}])
                if select.select([follower.stdout], [], [], 0.5)[0]:
                    line = follower.stdout.readline()
            assert json.loads(line)["message"] == "hello follower"
        finally:
            follower.terminate()


def test_logs_shows_the_newest_lines_last(control: Control) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    control.post_log(
        [
            {
                "service": "tail",
                "message": f"line {n}",
                "time": (start + timedelta(seconds=n)).isoformat(),
            }
            for n in range(10)
        ]
    )
    shown = control.run("logs", "tail", "-n", "3", "--json", check=True).stdout.splitlines()
    assert [json.loads(line)["message"] for line in shown] == ["line 7", "line 8", "line 9"]
    shown = control.run("logs", "tail", "--limit", "2", check=True).stdout.splitlines()
    assert ["line 8" in shown[0], "line 9" in shown[1]] == [True, True]


def test_logs_refuses_unknown_services_and_id_prefixes(control: Control) -> None:
    result = control.run("logs", "no-such-service")
    assert result.returncode == 1
    assert "no-such-service" in result.stderr
    result = control.run("logs", "--app", "ffff0000")
    assert result.returncode == 1
    assert "ffff0000" in result.stderr


def test_launch_through_the_suite(control: Control) -> None:
    dep_id = control.launch()
    assert control.through_proxy(dep_id) == 200

    def logs() -> list[dict[str, Any]]:
        out = control.run("logs", "--app", dep_id[:10], "--json", check=True).stdout
        return [json.loads(line) for line in out.splitlines()]

    # the app's own lines arrive once its writes pause (the aggregator reads them together)
    wait_for(
        lambda: {"deploy-kubernetes", "app"} <= {r["service"] for r in logs()},
        timeout=30,
        what="the server's and the app's lines about the deployment",
    )
    assert {r["id"] for r in logs()} == {dep_id}


def test_proxy_fronts_the_pages_and_logs_no_line_per_api_request(control: Control) -> None:
    control.launch()
    public = f"http://127.0.0.1:{control.ports['proxy']}"
    # what no app's route takes is the deploy server's: its pages, and the page of a session
    # that is not (or no longer) there
    assert "Launch an app" in httpx.get(public + "/", timeout=5).text
    gone = httpx.get(f"{public}/user/{'0' * 32}/lab", timeout=5)
    assert gone.status_code == 404
    assert "No such session" in gone.text
    assert control.through_proxy("0" * 32) == 404
    log = control.home / "logs" / "proxy.out.log"
    # no line per API request (the keeper's look at its sentinel route is one a round); only a
    # sentinel found missing, when the proxy has started afresh, is worth its warning line
    lines = [line for line in log.read_text().splitlines() if "/api/routes" in line]
    assert all("404 GET /api/routes/_binder-keeper" in line for line in lines), lines
    assert len(lines) <= 1, lines


def test_secrets_appear_in_no_command_line_config_or_log(control: Control) -> None:
    secrets_ = control.secret_values()
    assert len(set(secrets_)) == 4
    for name in ("api-key", *SECRET_FILES, "secrets.env"):
        assert (control.home / name).stat().st_mode & 0o777 == 0o600, name
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert not [s for s in secrets_ if s.encode() in cmdline], cmdline
    files = [control.home / "supervisord.conf", control.home / "effective.toml"]
    files += [p for p in (control.home / "logs").rglob("*") if p.is_file()]
    for path in files:
        text = path.read_text(errors="replace")
        assert not [s for s in secrets_ if s in text], path
    shown = control.run("config", check=True).stdout + control.run("config", "--render").stdout
    assert not [s for s in secrets_ if s in shown]
    assert "api key (BINDER_API_KEY): set (masked)" in shown
    stored = control.run("logs", "-n", "5000", "--json", check=True).stdout
    assert not [s for s in secrets_ if s in stored]


def test_internal_services_refuse_clients_without_credentials(control: Control) -> None:
    anonymous: MongoClient[dict[str, Any]] = MongoClient(
        f"mongodb://127.0.0.1:{control.ports['db']}/?directConnection=true",
        serverSelectionTimeoutMS=5000,
    )
    with anonymous, pytest.raises(OperationFailure, match="requires authentication"):
        anonymous["binder"].list_collection_names()
    uri = control.secrets()["BINDER_DB_URI"]
    wrong = uri.replace((control.home / "db-password").read_text().strip(), "0" * 48)
    with (
        MongoClient[dict[str, Any]](wrong, serverSelectionTimeoutMS=5000) as client,
        pytest.raises(OperationFailure, match="uthentication failed"),
    ):
        client["binder"].list_collection_names()
    with MongoClient[dict[str, Any]](uri, serverSelectionTimeoutMS=5000) as client:
        assert "deployments" in client["binder"].list_collection_names()
    logs = f"http://127.0.0.1:{control.ports['logging']}/logs"
    assert httpx.get(logs, timeout=5).status_code == 403
    assert (
        httpx.post(logs, json=[{"service": "x", "message": "forged"}], timeout=5).status_code == 403
    )
    assert control.post_log([{"service": "x", "message": "genuine"}]).status_code == 200


def test_read_only_commands_with_another_key_change_nothing(control: Control) -> None:
    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {
            p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in control.home.iterdir()
            if p.is_file() and p.name not in ("supervisord.pid",)
        }

    before, key = snapshot(), control.api_key
    other = {"BINDER_API_KEY": secrets.token_hex(16)}
    for command in (
        ["status"],
        ["status", "--json"],
        ["config"],
        ["config", "--render"],
        ["logs", "-n", "1"],
        ["systemd-unit"],
        ["api-key"],
        ["db", "status"],
    ):
        control.run(*command, env=other)
    assert snapshot() == before
    assert control.run("api-key", env=other, check=True).stdout.strip() == key
    url = f"{control.deploy_url}/applications/"
    assert httpx.get(url, headers={"Authorization": key}, timeout=5).status_code == 200


@pytest.mark.parametrize("service", ["db", "logging", "proxy", "deploy-kubernetes"])
def test_kill9_of_a_service_is_restarted_and_deployments_survive(
    control: Control, service: str
) -> None:
    dep_id = control.launch()
    before = control.status()[service]
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(
        lambda: (
            (r := control.status()[service])["pid"] not in (None, before["pid"])
            and r["state"] == "RUNNING"
            and r["ready"]
        ),
        timeout=60,
        what=f"{service} to come back",
    )
    after = control.status()[service]
    assert after["restarts"] >= before["restarts"] + 1
    wait_for(
        lambda: control.run("status").returncode == 0, timeout=30, what="the whole suite ready"
    )
    assert control.dep(dep_id)["status"] == "deployed"
    wait_for(
        lambda: control.through_proxy(dep_id) == 200, timeout=30, what="the app through the proxy"
    )
    assert control.through_proxy(control.launch()) == 200


def test_deploy_server_alone_restarts_with_a_new_key(control: Control) -> None:
    old, new = control.api_key, secrets.token_hex(16)
    before = control.status()
    control.run(
        "deploy-kubernetes", "start", "--api-key", new, "--config", str(control.config), check=True
    )
    after = control.status()
    assert after["deploy-kubernetes"]["pid"] != before["deploy-kubernetes"]["pid"]
    assert after["db"]["pid"] == before["db"]["pid"]
    url = f"{control.deploy_url}/applications/"
    assert httpx.get(url, headers={"Authorization": new}).status_code == 200
    assert httpx.get(url, headers={"Authorization": old}).status_code == 403
    assert control.run("api-key", check=True).stdout.strip() == new


def test_restart_one_service_keeps_the_others(control: Control) -> None:
    before = control.status()
    control.run("restart", "proxy", check=True)
    after = control.status()
    assert after["proxy"]["pid"] != before["proxy"]["pid"]
    assert after["db"]["pid"] == before["db"]["pid"]
    assert after["deploy-kubernetes"]["pid"] == before["deploy-kubernetes"]["pid"]


def test_stop_all_leaves_no_process_and_no_port(control: Control) -> None:
    dep_id = control.launch()
    pids = _suite_pids(control.home)
    assert pids
    control.run("stop-all", check=True)
    assert [p for p in pids if alive(p)] == []
    assert _suite_pids(control.home) == []
    assert not any(port_open(p) for p in control.ports.values())
    assert control.run("status").returncode == 1
    # the next start finds the stopped app's record final, not lost
    control.run("start-all", check=True)
    assert control.dep(dep_id)["status"] == "deleted"


def test_service_that_cannot_start_fails_with_its_stderr(tmp_path: Path) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    c.config.write_text(
        c.config.read_text().replace(
            "[db]\n", "[db]\ncommand = \"/bin/sh -c 'echo database exploded >&2; exit 3'\"\n"
        )
    )
    try:
        result = c.run("start-all", "--config", str(c.config))
        assert result.returncode == 1
        assert "db" in result.stderr
        assert "database exploded" in result.stderr
        assert _suite_pids(c.home) == []
    finally:
        c.run("stop-all")


def test_start_all_failing_half_way_stops_what_it_started(tmp_path: Path) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    # a valid address this host does not have: the aggregator, second in order, cannot bind it
    c.config.write_text(
        c.config.read_text().replace("[logging]\n", '[logging]\nhost = "192.0.2.1"\n')
    )
    try:
        result = c.run("start-all", "--config", str(c.config))
        assert result.returncode == 1
        assert "service logging" in result.stderr
        assert "Traceback" not in result.stderr.splitlines()[0]
        assert _suite_pids(c.home) == []
        assert not port_open(c.ports["db"])
        assert not port_open(c.ports["logging"])
    finally:
        c.run("stop-all")


def test_bad_config_and_busy_port_are_refused_before_anything_starts(tmp_path: Path) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[deploy]\nport = 'eighty'\n")
    result = c.run("start-all", "--config", str(bad))
    assert result.returncode == 1
    assert "bad.toml" in result.stderr
    assert "deploy.port" in result.stderr
    assert "integer" in result.stderr
    assert not (c.home / "supervisord.pid").exists()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", c.ports["logging"]))
        busy.listen()
        result = c.run("start-all", "--config", str(c.config))
    assert result.returncode == 1
    assert f"port {c.ports['logging']}" in result.stderr
    assert "logging" in result.stderr
    assert not port_open(c.ports["db"]), "nothing may start when a port is taken"


BAD_VALUES = [  # (text in the good config, replacement, the key the refusal names)
    ('\nhost = "127.0.0.1"', '\nhost = "not a host"', "deploy.host"),
    ("[deploy]\n", "[deploy]\nmax_age_seconds = -1\n", "deploy.max_age_seconds"),
    ("[deploy]\n", "[deploy]\ndefault_cull_timeout_ms = -5\n", "deploy.default_cull_timeout_ms"),
    ("[deploy]\n", "[deploy]\ncull_interval_seconds = -1\n", "deploy.cull_interval_seconds"),
    ("[logging]\n", "[logging]\nmax_body_bytes = 0\n", "logging.max_body_bytes"),
    ("[deploy]\n", '[deploy]\ntemplates_dir = "/no/such/folder"\n', "deploy.templates_dir"),
    ('public_host = "', 'public_host = "http://', "proxy.public_host"),
    ("[logging]\nport = {logging}", "[logging]\nport = {deploy}", "deploy.port"),
]


@pytest.mark.parametrize(("old", "new", "key"), BAD_VALUES, ids=[k for *_, k in BAD_VALUES])
def test_bad_values_are_refused_before_anything_starts(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    bad = tmp_path / "bad.toml"
    old, new = old.format(**c.ports), new.format(**c.ports)
    assert old in c.config.read_text()
    bad.write_text(c.config.read_text().replace(old, new, 1))
    result = c.run("start-all", "--config", str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    assert key in result.stderr
    assert "bad.toml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (c.home / "supervisord.pid").exists()
    assert _suite_pids(c.home) == []


def test_usage_errors_exit_2_and_failures_say_why_in_one_line(tmp_path: Path) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    assert c.run("start-all", "--no-such-flag").returncode == 2
    assert c.run("restart").returncode == 2
    nosuch = c.run("restart", "nosuch")
    assert nosuch.returncode == 2
    assert "nosuch" in nosuch.stderr
    stopped = c.run("restart", "proxy", "--config", str(c.config))
    assert stopped.returncode == 1
    assert len(stopped.stderr.strip().splitlines()) == 1, stopped.stderr
    assert "not running" in stopped.stderr


def test_global_options_go_before_or_after_the_command(tmp_path: Path) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    c.config.write_text(
        c.config.read_text().replace("[deploy]\n", "[deploy]\nmax_deployments = 9\n")
    )
    for argv in (
        ["--home", str(c.home), "--config", str(c.config), "config"],
        ["config", "--home", str(c.home), "--config", str(c.config)],
        ["config", f"--home={c.home}", f"--config={c.config}"],
    ):
        result = subprocess.run([str(BIN), *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "max_deployments = 9" in result.stdout
    assert not c.home.exists(), "a read-only command wrote to the home"


def test_a_squatted_proxy_port_at_start_gets_nothing_and_the_proxy_comes_back(
    tmp_path: Path,
) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    c.run("start-all", "--config", str(c.config), check=True)
    try:
        dep_id = c.launch()
        token = c.secrets()["CONFIGPROXY_AUTH_TOKEN"].encode()
        c.run("proxy", "stop", check=True)
        with Squatter(c.ports["proxy_api"]) as squatter:
            started = c.run("proxy", "start")
            assert started.returncode == 1
            assert f"user {NOBODY}" in started.stderr, started.stderr
            err_log = c.home / "logs" / "proxy.err.log"
            wait_for(
                lambda: f"is taken by user {NOBODY}" in err_log.read_text(),
                what="the proxy's log to say who holds its port",
            )
            wait_for(
                lambda: f"user {NOBODY}" in httpx.get(f"{c.deploy_url}/health").json()["proxy"],
                what="the deploy server's keeper to refuse the squatted port",
            )
            wait_for(  # waiting for its port, not FATAL or STOPPED
                lambda: c.status()["proxy"]["state"] == "RUNNING", what="the proxy RUNNING"
            )
            assert not c.status()["proxy"]["ready"]
            assert token not in squatter.received()
        wait_for(lambda: c.status()["proxy"]["ready"], timeout=30, what="the proxy ready again")
        wait_for(lambda: c.through_proxy(dep_id) == 200, timeout=20, what="the route back")
    finally:
        c.run("stop-all")
