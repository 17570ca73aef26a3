"""supervisord.conf rendering (golden file) and the CLI's handling of bad input."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from typer.testing import CliRunner

from common.settings import load_settings
from control.cli import app
from control.services import ROOT, declare
from control.supervisord import render

GOLDEN = Path(__file__).parent / "golden" / "supervisord.conf"


def _rendered() -> str:
    home = Path("/srv/binder")
    settings = load_settings(home=home, environ={})
    text = render(
        home=home, python=sys.executable, services=declare(settings, home / "effective.toml")
    )
    return text.replace(str(Path(sys.executable).parent), "<venv>/bin").replace(str(ROOT), "<root>")


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
    assert "control.launch /srv/binder/secrets.env BINDER_API_KEY,CONFIGPROXY_AUTH_TOKEN" in text


def test_db_uri_means_no_db_program() -> None:
    settings = load_settings(
        home=Path("/srv/b"), environ={"BINDER_DB_URI": "mongodb://db.example/"}
    )
    names = [s.name for s in declare(settings, Path("/srv/b/effective.toml"))]
    assert names == ["logging", "proxy", "deploy-kubernetes"]


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
