"""supervisord.conf rendering (golden file) and the CLI's handling of bad input."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.errors import ConfigError
from common.settings import load_settings
from control.cli import app
from control.services import ROOT, declare
from control.suite import Suite
from control.supervisord import render

GOLDEN = Path(__file__).parent / "golden" / "supervisord.conf"


def _rendered() -> str:
    home = Path("/srv/binder")
    settings = load_settings(home=home, environ={})
    text = render(
        home=home, python=sys.executable, services=declare(settings, home / "effective.toml")
    )
    text = text.replace(str(Path(sys.executable).parent), "<venv>/bin").replace(str(ROOT), "<root>")
    return text.replace(f" {shutil.which('node') or 'node'} ", " <node> ")


def test_rendered_config_matches_golden_file() -> None:
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(_rendered())
    assert _rendered() == GOLDEN.read_text()


def test_rendered_config_has_what_operators_rely_on() -> None:
    text = _rendered()
    for name in ("db", "logging", "proxy", "deploy-kubernetes"):
        assert f"[program:{name}]" in text
    assert "chmod=0700" in text
    assert "stopasgroup=true" in text
    assert "stdout_logfile_maxbytes=10MB" in text
    # secrets reach programs through the owner-only env file, never the config or argv
    assert (
        "control.launch --secrets /srv/binder/secrets.env BINDER_API_KEY,CONFIGPROXY_AUTH_TOKEN"
        in text
    )


def test_db_uri_means_no_db_program() -> None:
    settings = load_settings(
        home=Path("/srv/b"), environ={"BINDER_DB_URI": "mongodb://db.example/"}
    )
    declared = declare(settings, Path("/srv/b/effective.toml"))
    assert [s.name for s in declared if not s.external] == ["logging", "proxy", "deploy-kubernetes"]
    suite = Suite(settings)
    assert [s.name for s in suite.services] == ["logging", "proxy", "deploy-kubernetes"]
    assert "[program:db]" not in suite.render()
    with pytest.raises(ConfigError, match="external MongoDB"):
        suite.service("db")


def test_declarations_say_the_order_and_what_runs_after_a_stop() -> None:
    """Control acts on what each service declares: start order by priority, the deploy
    server's apps ended after it stops (not on kubernetes, whose pods outlive a host)."""
    for backend, hook in (("local", True), ("docker", True), ("kubernetes", False)):
        settings = load_settings(home=Path("/srv/b"), environ={"BINDER_DEPLOY_BACKEND": backend})
        declared = declare(settings, Path("/srv/b/effective.toml"))
        assert [s.priority for s in declared] == sorted(s.priority for s in declared)
        deploy = declared[-1]
        assert deploy.name == "deploy-kubernetes"
        assert bool(deploy.stop_hook) is hook, backend
        assert deploy.stop_hook[-1:] == (("--stop-apps",) if hook else ())
        assert deploy.hook_needs == ("db",)
        text = render(home=Path("/srv/b"), python="/py", services=declared)
        priorities = [
            int(line.split("=")[1]) for line in text.splitlines() if line.startswith("priority=")
        ]
        assert priorities == [10, 20, 30, 40]


def test_bad_config_exits_1_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy]\napi_port = true\n")
    result = CliRunner().invoke(
        app, ["--home", str(tmp_path / "h"), "--config", str(bad), "config"]
    )
    assert result.exit_code == 1
    assert "proxy.api_port" in result.output


def test_config_on_a_fresh_home_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["--home", str(tmp_path / "h"), "config"],
        env={"BINDER_API_KEY": "0123456789abcdef0123456789abcdef"},
    )
    assert result.exit_code == 0, result.output
    assert "0123456789abcdef0123456789abcdef" not in result.output
    assert "[deploy.kubernetes]" in result.output
    assert "api key (BINDER_API_KEY): not set" in result.output
    assert not (tmp_path / "h").exists()


def test_systemd_unit_runs_supervisord_in_the_foreground(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "systemd-unit"])
    assert result.exit_code == 0, result.output
    assert f"-n -c {tmp_path / 'h'}/supervisord.conf" in result.output
    assert "Restart=always" in result.output
    assert f"EnvironmentFile={tmp_path / 'h'}/secrets.env" in result.output


def test_several_servers_render_as_one_group_of_numbered_processes() -> None:
    home = Path("/srv/binder")
    settings = load_settings(home=home, environ={"BINDER_DEPLOY_SERVERS": "3"})
    services = declare(settings, home / "effective.toml")
    deploy = next(s for s in services if s.name == "deploy-kubernetes")
    assert deploy.process_names() == [f"deploy-kubernetes:{n}" for n in range(3)]
    assert deploy.ready_socket == "/srv/binder/run/deploy-kubernetes.{n}.sock"
    section = render(home=home, python=sys.executable, services=services).split(
        "[program:deploy-kubernetes]"
    )[1]
    for line in (
        "numprocs=3",
        "process_name=%(process_num)d",
        "deploy-kubernetes.out.%(process_num)d.log",
        "deploy-kubernetes.err.%(process_num)d.log",
        'BINDER_READY_SOCKET="/srv/binder/run/deploy-kubernetes.%(process_num)d.sock"',
    ):
        assert line in section, line
    others = [s for s in services if s.name != "deploy-kubernetes"]
    assert all(s.process_names() == [s.name] for s in others), "the others run one process"
