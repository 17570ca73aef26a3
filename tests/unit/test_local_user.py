"""Which user the local backend runs apps as, and the refusals (before anything starts)."""

from __future__ import annotations

import os

import pytest

from common.errors import ConfigError
from common.settings import LocalSettings
from services.deploy_kubernetes.backends.local.users import app_user


def test_root_is_refused_unless_allowed_explicitly() -> None:
    with pytest.raises(ConfigError, match=r"apps would run as root .*allow_root = true"):
        app_user(LocalSettings(user="root"))
    if os.geteuid() == 0:
        assert app_user(LocalSettings(user="root", allow_root=True)) is None  # the server's own


def test_a_missing_user_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"deploy.local.user: there is no user 'no-such-user-x'"):
        app_user(LocalSettings(user="no-such-user-x"))


def test_a_sandbox_needs_a_server_running_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.deploy_kubernetes.backends.local import checks

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError) as refused:
        checks.check_local(LocalSettings())
    assert refused.value.message.startswith("deploy.local.sandbox: sandboxed apps need")
    assert "[deploy.local] sandbox = false" in refused.value.message
    assert "\n" not in refused.value.message
    checks.check_local(LocalSettings(sandbox=False, user=""))  # trusted templates: as itself


def test_a_bad_uid_range_is_refused_before_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.deploy_kubernetes.backends.local import checks

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ConfigError, match=r"deploy\.local\.uid_range"):
        checks.check_local(LocalSettings(uid_range="0-10"))
