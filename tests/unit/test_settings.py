"""Layered settings: defaults, then the --config file, then BINDER_* variables; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import load_settings


def test_defaults_match_the_spec(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path, environ={})
    assert (s.db.port, s.proxy.port, s.proxy.api_port, s.logging.port, s.deploy.port) == (
        27017,
        8000,
        8001,
        8050,
        8084,
    )
    assert s.deploy.backend == "local"
    assert s.deploy.max_deployments == 100
    assert s.deploy.kubernetes.namespace == "binder"
    assert s.public_host.endswith(":8000")


def test_config_file_overrides_defaults_and_environment_overrides_both(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[deploy]\nport = 9000\nmax_deployments = 5\n[deploy.kubernetes]\nnamespace = "x"\n'
    )
    s = load_settings(cfg, home=tmp_path, environ={"BINDER_DEPLOY_PORT": "9100"})
    assert s.deploy.port == 9100
    assert s.deploy.max_deployments == 5
    assert s.deploy.kubernetes.namespace == "x"


def test_secrets_come_from_the_environment_and_stay_out_of_repr(tmp_path: Path) -> None:
    s = load_settings(
        home=tmp_path, environ={"BINDER_API_KEY": "sekrit", "CONFIGPROXY_AUTH_TOKEN": "tok"}
    )
    assert s.api_key == "sekrit"
    assert s.proxy.token == "tok"
    assert "sekrit" not in repr(s)
    assert "tok" not in repr(s.proxy)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[deploy]\nport = 'x'\n", "'deploy.port' must be an integer"),
        ("[deploy]\nbackend = 'mars'\n", "deploy.backend"),
        ("[deploy]\nportt = 1\n", "unknown key 'deploy.portt'"),
        ("[proxy]\nport = 70000\n", "'proxy.port' must be a port"),
        ("[deploy\n", "not valid TOML"),
        ("[deploy]\nhost = 'not a host'\n", "'deploy.host' must be an IP address or a host name"),
        ("[db]\nhost = '-bad-'\n", "'db.host' must be"),
        ("[deploy]\nmax_age_seconds = -1\n", "'deploy.max_age_seconds' must be greater than 0"),
        ("[deploy]\ndefault_cull_timeout_ms = -1\n", "'deploy.default_cull_timeout_ms'"),
        ("[deploy]\ncull_interval_seconds = -1\n", "'deploy.cull_interval_seconds'"),
        ("[logging]\nmax_body_bytes = 0\n", "'logging.max_body_bytes' must be greater than 0"),
        ("[deploy]\ntemplates_dir = '/no/such'\n", "'deploy.templates_dir' must be an existing"),
        ("[proxy]\npublic_host = 'https://h.org'\n", "'proxy.public_host' must be host"),
        ("[proxy]\npublic_host = 'h.org/x'\n", "'proxy.public_host'"),
        ("[proxy]\npublic_host = 'h.org:0'\n", "'proxy.public_host'"),
        ("[proxy]\napi_port = 8000\n", "'proxy.api_port' and 'proxy.port' are both 8000"),
        ("[logging]\nport = 8084\n", "'deploy.port' and 'logging.port' are both 8084"),
    ],
)
def test_bad_config_names_file_key_and_type(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(cfg, home=tmp_path, environ={})
    assert str(info.value).startswith(str(cfg))


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BINDER_LOGGING_PORT"):
        load_settings(home=tmp_path, environ={"BINDER_LOGGING_PORT": "many"})


def test_public_use_limits_have_the_spec_defaults(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path, environ={})
    assert s.deploy.per_client_max_deployments == 20
    assert s.deploy.per_client_launches_per_minute == 30
    assert s.deploy.trusted_proxies == ()
    assert (s.deploy.local.user, s.deploy.local.allow_root) == ("", False)


def test_trusted_proxies_come_from_a_list_or_a_comma_separated_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[deploy]\ntrusted_proxies = ["10.0.0.1", "192.168.0.0/16"]\n')
    assert load_settings(cfg, home=tmp_path, environ={}).deploy.trusted_proxies == (
        "10.0.0.1",
        "192.168.0.0/16",
    )
    env = {"BINDER_DEPLOY_TRUSTED_PROXIES": "10.0.0.1, ::1"}
    assert load_settings(home=tmp_path, environ=env).deploy.trusted_proxies == ("10.0.0.1", "::1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[deploy]\ntrusted_proxies = ["a proxy"]\n', "'deploy.trusted_proxies' must list IP"),
        ('[deploy]\ntrusted_proxies = "10.0.0.1"\n', "'deploy.trusted_proxies' must be a list"),
        ("[deploy]\nper_client_max_deployments = 0\n", "'deploy.per_client_max_deployments'"),
        ("[http]\nheader_timeout_seconds = -1\n", "'http.header_timeout_seconds' must be greater"),
        ("[deploy.local]\nallow_root = 1\n", "'deploy.local.allow_root' must be true or false"),
    ],
)
def test_bad_public_use_limits_are_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, home=tmp_path, environ={})


@pytest.mark.parametrize(
    "public_host", ["binder.example.org", "binder.example.org:443", "10.0.0.1:8000", "[::1]:8000"]
)
def test_good_public_hosts_are_accepted(tmp_path: Path, public_host: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[proxy]\npublic_host = '{public_host}'\n")
    assert load_settings(cfg, home=tmp_path, environ={}).public_host == public_host


def test_an_external_database_frees_the_db_port(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[db]\nuri = 'mongodb://u:p@db.example/'\nport = 8084\n")
    assert load_settings(cfg, home=tmp_path, environ={}).db.port == 8084


def test_the_logging_token_comes_from_the_environment_only(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path, environ={"BINDER_LOGGING_TOKEN": "ltok"})
    assert s.logging.token == "ltok"
    assert "ltok" not in repr(s)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[logging]\ntoken = 'in-a-file'\n")
    with pytest.raises(ConfigError, match=r"unknown key 'logging\.token'"):
        load_settings(cfg, home=tmp_path, environ={})


def test_the_docker_label_is_derived_from_the_home_unless_configured(tmp_path: Path) -> None:
    one = load_settings(home=tmp_path / "one", environ={})
    two = load_settings(home=tmp_path / "two", environ={})
    assert one.deploy.docker.suite_label == ""
    labels = {s.deploy.docker.label(s.home) for s in (one, two)}
    assert len(labels) == 2
    assert all(label.startswith("binder-") for label in labels)
    assert one.deploy.docker.label(one.home) == one.deploy.docker.label(tmp_path / "one")
    named = load_settings(
        home=tmp_path / "one", environ={"BINDER_DEPLOY_DOCKER_SUITE_LABEL": "blue"}
    )
    assert named.deploy.docker.label(named.home) == "blue"
