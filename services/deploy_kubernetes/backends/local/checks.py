"""What the local backend needs of the host, checked before the deploy server starts: a refusal
is one line naming the setting to change."""

from __future__ import annotations

import os

from common.errors import ConfigError
from common.settings import LocalSettings
from services.deploy_kubernetes.backends.local.helper import bwrap, helper
from services.deploy_kubernetes.backends.local.uids import parse_range
from services.deploy_kubernetes.backends.local.users import app_user


def check_local(settings: LocalSettings) -> None:
    """``ConfigError`` when apps cannot run as ``settings`` say: a sandbox (the default) needs a
    server running as root, bwrap and a valid uid range; unsandboxed apps need their user. Both
    need ``binder-sandbox``, which every app is started through."""
    helper()
    if not settings.sandbox:
        app_user(settings)
        return
    if os.geteuid() != 0:
        raise ConfigError(
            "deploy.local.sandbox: sandboxed apps need a deploy server running as root; run it "
            "as root, or set [deploy.local] sandbox = false (trusted templates only)"
        )
    parse_range(settings.uid_range)
    bwrap()
