"""The CLI through typer's CliRunner: secrets shown masked, read-only commands that write nothing,
usage errors, global options anywhere."""

from __future__ import annotations

import os
import socket
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


COMMANDS = [
    [],
    ["start-all"],
    ["stop-all"],
    ["status"],
    ["restart"],
    ["logs"],
    ["config"],
    ["systemd-unit"],
    ["api-key"],
    ["db"],
    ["deploy-kubernetes"],
    ["deploy-kubernetes", "start"],
    ["proxy", "status"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv) or "top")
def test_help_names_values_as_words_and_shows_no_markup(argv: list[str]) -> None:
    result = CliRunner().invoke(app, [*argv, "--help"])
    assert result.exit_code == 0, result.output
    for leak in ("<bool>", "<str>", "<path>", "<int", "``"):
        assert leak not in result.output, (leak, result.output)
    cut = [
        line for line in result.output.splitlines() if line.endswith("...") and "Usage" not in line
    ]
    assert not cut, cut  # no summary cut short


def test_deploy_servers_help_says_its_name_holds_on_every_backend() -> None:
    result = CliRunner().invoke(app, ["deploy-kubernetes", "--help"])
    assert "every backend" in result.output


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["logs", "--since", "5x"], "--since"),
        (["logs", "--app", ""], "--app"),
        (["logs", "--app", "XYZ"], "--app"),
    ],
)
def test_bad_log_filters_are_usage_errors(tmp_path: Path, argv: list[str], named: str) -> None:
    result = CliRunner().invoke(app, ["--home", str(_home(tmp_path)), *argv])
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_good_durations_and_times_pass_the_since_check() -> None:
    from control.cli import _since

    for value in ("90s", "10m", "2h", "1.5d", "1w", "2026-01-31T12:00", "2026-01-31"):
        assert _since(value) == value


def test_an_unknown_binder_variable_is_refused_naming_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["--home", str(_home(tmp_path)), "config"], env={"BINDER_DEPLOY_PROT": "9000"}
    )
    assert result.exit_code == 1
    assert "BINDER_DEPLOY_PROT" in result.output
    assert "BINDER_DEPLOY_PORT" in result.output  # the closest setting


def test_status_of_a_home_never_started_says_how_to_start_and_writes_nothing(
    tmp_path: Path,
) -> None:
    home = tmp_path / "never"
    result = CliRunner().invoke(app, ["--home", str(home), "status"])
    assert result.exit_code == 1
    assert "never been started" in result.output
    assert "start-all" in result.output
    assert not home.exists()


def test_a_refused_start_writes_nothing_into_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    config = tmp_path / "taken.toml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config.write_text(f"[logging]\nport = {taken.getsockname()[1]}\n")
        result = CliRunner().invoke(
            app, ["--home", str(home), "--config", str(config), "start-all"]
        )
    assert result.exit_code == 1, result.output
    assert "in use" in result.output
    assert not home.exists()


def test_two_homes_install_two_systemd_units(tmp_path: Path) -> None:
    from control.systemd import unit_path

    first, second = unit_path(tmp_path / "a"), unit_path(tmp_path / "b")
    assert first != second
    assert first.parent == second.parent == Path("/etc/systemd/system")
    assert unit_path(Path("~/.binder").expanduser()).name == "binder.service"


def test_app_text_cannot_drive_the_operators_terminal() -> None:
    from control.logs_cmd import neutral

    shown = neutral("ok\x1b]0;owned\x07\x1b[2J\rfake\u202eevil\n2026-01-01 deploy ERROR forged")
    assert not any(ch in shown for ch in "\x1b\x07\r\u202e")
    assert "\\x1b" in shown
    assert "\n2026" not in shown  # a second line cannot pass for a record of its own
