"""The suite's secrets, stored owner-only in the home and handed to services by environment.

One file per secret holds its value: ``api-key``, ``proxy-token``, ``logging-token`` and
``db-password``. ``<home>/secrets.env`` holds what the services get, as ``NAME=value`` lines, for
the launcher (``control.launch``) and for systemd's EnvironmentFile:

- ``BINDER_API_KEY``: the deploy API key;
- ``CONFIGPROXY_AUTH_TOKEN``: the proxy's API token;
- ``BINDER_LOGGING_TOKEN``: the bearer token of the log aggregator's ingest and query;
- ``BINDER_DB_URI``: the suite's database URI, credentials included.

Every file is written 0600 before anything is put in it. Reading never writes: only the commands
that (re)start services call :func:`ensure_secrets`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from common.errors import ConfigError
from common.settings import Settings

KEY_RE = re.compile(r"^[\x21-\x7e]{16,256}$")
DB_USER = "binder"
"""The user the embedded database server is provisioned with."""
SECRET_NAMES = (
    "BINDER_API_KEY",
    "CONFIGPROXY_AUTH_TOKEN",
    "BINDER_LOGGING_TOKEN",
    "BINDER_DB_URI",
)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, replacing it atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def ensure_home(home: Path) -> None:
    for sub in ("", "logs", "logs/apps", "db", "run"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def stored_api_key(home: Path) -> str:
    """The key the suite was last started with (empty before the first start)."""
    return _read(home / "api-key")


def choose_api_key(home: Path, given: str | None, environ: Mapping[str, str]) -> str:
    """``--api-key``, else ``BINDER_API_KEY``, else the stored key, else a new one.

    Nothing is written: :func:`ensure_secrets` stores it when services are (re)started.
    """
    key = given or environ.get("BINDER_API_KEY") or stored_api_key(home) or secrets.token_hex(16)
    if not KEY_RE.match(key):
        raise ConfigError("the API key must be 16 to 256 printable characters without spaces")
    return key


def _token(path: Path, make: int) -> str:
    """The value stored in ``path``, made (``make`` random bytes, hex) when there is none."""
    value = _read(path)
    if not value:
        value = secrets.token_hex(make)
        write_private(path, value + "\n")
    return value


def db_uri(settings: Settings, *, password: str | None, embedded: bool) -> str:
    """The URI the services use: the operator's ``db.uri`` as it is, else the suite's own server,
    with the suite's credentials when it is the embedded server (which requires them)."""
    if settings.db.uri:
        return settings.db.uri
    base = settings.db.effective_uri
    if not embedded or not password:
        return base
    parts = urlsplit(base)
    netloc = f"{quote(DB_USER, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit(parts._replace(netloc=netloc, query=f"{parts.query}&authSource=admin"))


def ensure_secrets(
    home: Path, *, settings: Settings, api_key: str, embedded_db: bool
) -> dict[str, str]:
    """Store every secret (made at the first start) and ``secrets.env``; return its values."""
    if api_key != stored_api_key(home):
        write_private(home / "api-key", api_key + "\n")
    values = {
        "BINDER_API_KEY": api_key,
        "CONFIGPROXY_AUTH_TOKEN": _token(home / "proxy-token", 32),
        "BINDER_LOGGING_TOKEN": _token(home / "logging-token", 32),
        "BINDER_DB_URI": db_uri(
            settings, password=_token(home / "db-password", 24), embedded=embedded_db
        ),
    }
    if read_env_file(home / "secrets.env") != values:
        write_env_file(home, values)
    return values


def read_secrets(home: Path) -> dict[str, str]:
    """What ``secrets.env`` holds (empty before the first start); never writes."""
    return read_env_file(home / "secrets.env")


def write_env_file(home: Path, values: Mapping[str, str]) -> Path:
    path = home / "secrets.env"
    write_private(path, "".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in _read(path).splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip():
            out[name.strip()] = value
    return out


def described(value: str) -> str:
    """How ``config`` shows a secret: whether it is set, never any of it."""
    return "set (masked)" if value else "not set"
