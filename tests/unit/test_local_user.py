"""Which user the local backend runs apps as, and the refusals (before anything starts)."""

from __future__ import annotations

import os

import pytest

from common.errors import ConfigError
from common.settings import LocalSettings
from services.deploy_kubernetes.backends.local import app_user


def test_root_is_refused_unless_allowed_explicitly() -> None:
    with pytest.raises(ConfigError, match=r"apps would run as root .*allow_root = true"):
        app_user(LocalSettings(user="root"))
    if os.geteuid() == 0:
        assert app_user(LocalSettings(user="root", allow_root=True)) is None  # the server's own


def test_a_missing_user_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"deploy.local.user: there is no user 'no-such-user-x'"):
        app_user(LocalSettings(user="no-such-user-x"))
