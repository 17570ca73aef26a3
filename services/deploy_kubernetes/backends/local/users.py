"""The user the local backend's apps run as: checked once, before anything starts.

Apps run as an unprivileged user of their own, never as root unless the operator allows it
(``[deploy.local] allow_root``); a server that is not root runs them as itself.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from common.errors import ConfigError
from common.settings import LocalSettings

DEDICATED_USER = "binder-app"
"""The user apps run as by default (``make setup`` creates it when run as root)."""


@dataclass(frozen=True)
class AppUser:
    """The unprivileged user apps run as."""

    name: str
    uid: int
    gid: int


def app_user(settings: LocalSettings) -> AppUser | None:
    """The user apps run as, checked; ``None`` means the server's own (non-root) user.

    Refuses (``ConfigError``, naming the setting) a user that does not exist, root unless
    ``allow_root`` says so, and a user a server that is not root cannot switch to."""
    euid = os.geteuid()
    name = settings.user or (DEDICATED_USER if euid == 0 else "")
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError as exc:
        hint = "run `make setup` as root to create it" if not settings.user else "create it"
        raise ConfigError(
            f"deploy.local.user: there is no user {name!r} for apps on this host; {hint}, "
            "or name another unprivileged user in [deploy.local] user"
        ) from exc
    if entry.pw_uid == 0 and not settings.allow_root:
        raise ConfigError(
            f"deploy.local.user: apps would run as root ({name!r}) and could take over the host; "
            "name an unprivileged user in [deploy.local] user, or set [deploy.local] "
            "allow_root = true to run them as root anyway"
        )
    if entry.pw_uid == euid:
        return None
    if euid != 0:
        raise ConfigError(
            f"deploy.local.user: only a server running as root can run apps as {name!r}"
        )
    return AppUser(name, entry.pw_uid, entry.pw_gid)
