"""The CLI through typer's CliRunner: secrets shown masked, read-only commands that write nothing,
usage errors, global options anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.settings import load_settings
from control.cli import app
from control.globals import hoist
from control.secrets import db_uri, ensure_secrets, read_secrets

KEY = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def _home(tmp_path: Path) -> Path:
    """A home as the first start-all leaves it (secrets made), without starting anything."""
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    settings = load_settings(home=home, environ={})
    ensure_secrets(home, settings=settings, api_key=KEY, embedded_db=True)
    return home


def _snapshot(home: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(home.rglob("*"))}


def test_secrets_are_made_once_stored_owner_only_and_composed_for_the_services(
    tmp_path: Path,
) -> None:
    home = _home(tmp_path)
    values = read_secrets(home)
    assert set(values) == {
        "BINDER_API_KEY",
        "CONFIGPROXY_AUTH_TOKEN",
        "BINDER_LOGGING_TOKEN",
        "BINDER_DB_URI",
    }
    password = (home / "db-password").read_text().strip()
    assert values["BINDER_DB_URI"] == (
        f"mongodb://binder:{password}@127.0.0.1:27017/?directConnection=true&authSource=admin"
    )
    for name in ("api-key", "proxy-token", "logging-token", "db-password", "secrets.env"):
        assert (home / name).stat().st_mode & 0o777 == 0o600, name
    before = _snapshot(home)
    settings = load_settings(home=home, environ={})
    assert ensure_secrets(home, settings=settings, api_key=KEY, embedded_db=True) == values
    assert _snapshot(home) == before


def test_an_operators_uri_is_used_as_it_is() -> None:
    settings = load_settings(environ={"BINDER_DB_URI": "mongodb://u:p@db.example/x"})
    assert db_uri(settings, password="ignored", embedded=False) == "mongodb://u:p@db.example/x"
    plain = load_settings(environ={})
    assert "@" not in db_uri(plain, password="pw", embedded=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["config"],
        ["config", "--render"],
        ["systemd-unit"],
        ["api-key"],
        ["proxy", "status"],
        ["logs", "-n", "1"],
    ],
)
def test_read_only_commands_with_another_key_write_nothing(tmp_path: Path, argv: list[str]) -> None:
    home = _home(tmp_path)
    before = _snapshot(home)
    CliRunner().invoke(app, ["--home", str(home), *argv], env={"BINDER_API_KEY": OTHER})
    assert _snapshot(home) == before
    result = CliRunner().invoke(app, ["--home", str(home), "api-key"])
    assert result.output.strip() == KEY


def test_config_shows_secrets_as_set_and_masks_a_uri_password(tmp_path: Path) -> None:
    home = _home(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[db]\nuri = "mongodb://ops:hunter2hunter2@db.example/"\n')
    result = CliRunner().invoke(app, ["--home", str(home), "--config", str(cfg), "config"])
    assert result.exit_code == 0, result.output
    assert "hunter2hunter2" not in result.output
    assert 'uri = "mongodb://ops:***@db.example/"' in result.output
    for secret in read_secrets(home).values():
        assert secret not in result.output
    for what in ("api key", "proxy token", "logging token", "database URI"):
        assert f"# {what} (" in result.output
    assert result.output.count("set (masked)") == 4


def test_api_key_before_the_first_start_says_how_to_get_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "api-key"])
    assert result.exit_code == 1
    assert "start-all" in result.output
    assert not (tmp_path / "h").exists()


def test_an_unknown_service_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "restart", "nosuch"])
    assert result.exit_code == 2
    assert "nosuch" in result.output


@pytest.mark.parametrize("argv", [["restart", "proxy"], ["proxy", "restart"]])
def test_restart_with_the_suite_stopped_says_so_in_one_line(
    tmp_path: Path, argv: list[str]
) -> None:
    home = _home(tmp_path)
    before = _snapshot(home)
    result = CliRunner().invoke(app, ["--home", str(home), *argv])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "not running" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _snapshot(home) == before


def test_global_options_are_accepted_after_the_command(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[deploy]\nmax_deployments = 7\n")
    home = str(tmp_path / "h")
    for argv in (["config", "--home", home, "--config", str(cfg)], ["config", f"--config={cfg}"]):
        result = CliRunner().invoke(app, argv, env={"BINDER_HOME": home})
        assert result.exit_code == 0, result.output
        assert "max_deployments = 7" in result.output


def test_hoist_moves_only_global_options() -> None:
    assert hoist(["logs", "-n", "3", "--home", "H", "db"]) == [
        "--home",
        "H",
        "logs",
        "-n",
        "3",
        "db",
    ]
    assert hoist(["x", "--config=C", "--", "--home"]) == ["--config=C", "x", "--", "--home"]


def test_logs_before_the_first_start_fails_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "logs"])
    assert result.exit_code == 1
    assert "start-all" in result.output
    assert os.path.exists(tmp_path / "h") is False
