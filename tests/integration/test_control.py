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
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import free_port, port_open, wait_for

from common.processes import alive

BIN = Path(sys.executable).parent / "binder-control"


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


def test_second_start_all_changes_nothing(control: Control) -> None:
    before = {k: v["pid"] for k, v in control.status().items()}
    result = control.run("start-all", "--config", str(control.config), check=True)
    assert control.api_key in result.stdout
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


def test_logs_follow_prints_new_lines(control: Control) -> None:
    argv = [str(BIN), "--home", str(control.home), "logs", "--follow", "--json", "ops"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as follower:
        assert follower.stdout is not None
        try:
            deadline = time.monotonic() + 20
            line = ""
            while not line:  # post until the follower, once subscribed, prints the line
                assert time.monotonic() < deadline, "logs --follow printed nothing"
                httpx.post(
                    f"http://127.0.0.1:{control.ports['logging']}/logs",
                    json=[{"service": "ops", "message": "hello follower"}],
                    timeout=5,
                )
                if select.select([follower.stdout], [], [], 0.5)[0]:
                    line = follower.stdout.readline()
            assert json.loads(line)["message"] == "hello follower"
        finally:
            follower.terminate()


def test_launch_through_the_suite(control: Control) -> None:
    dep_id = control.launch()
    assert control.through_proxy(dep_id) == 200
    logs = control.run("logs", "--app", dep_id, "--json", check=True).stdout.splitlines()
    services = {json.loads(line)["service"] for line in logs}
    assert {"deploy-kubernetes", "app"} <= services, services


def test_proxy_logs_a_missing_route_but_not_each_api_request(control: Control) -> None:
    control.launch()
    assert control.through_proxy("0" * 32) == 404
    log = control.home / "logs" / "proxy.out.log"
    wait_for(
        lambda: f"404 GET /user/{'0' * 32}/" in log.read_text(),
        timeout=10,
        what="the proxy's line for the missing route",
    )
    assert "/api/routes" not in log.read_text()


def test_secrets_appear_in_no_command_line(control: Control) -> None:
    token = (control.home / "proxy-token").read_text().strip()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert control.api_key.encode() not in cmdline
            assert token.encode() not in cmdline
    assert control.api_key not in (control.home / "supervisord.conf").read_text()
    shown = control.run("config", check=True).stdout
    assert control.api_key not in shown
    assert token not in control.run("config", "--render", check=True).stdout


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


def test_service_that_cannot_start_ends_fatal_with_its_stderr(tmp_path: Path) -> None:
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
        assert c.status()["db"]["state"] == "FATAL"
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


def test_usage_error_exits_2(tmp_path: Path) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    assert c.run("start-all", "--no-such-flag").returncode == 2
    assert c.run("restart").returncode == 2
