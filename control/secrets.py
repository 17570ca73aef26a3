"""The suite's secrets: the API key and the proxy token, stored owner-only in the home.

``<home>/api-key`` and ``<home>/proxy-token`` hold one value each; ``<home>/secrets.env`` holds
both as ``NAME=value`` lines for the launcher (``control.launch``) and for systemd's
EnvironmentFile. Every file is written 0600 before anything is put in it.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from common.errors import ConfigError

KEY_RE = re.compile(r"^[\x21-\x7e]{16,256}$")


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


def resolve_api_key(home: Path, given: str | None, environ: Mapping[str, str]) -> tuple[str, bool]:
    """``--api-key``, else ``BINDER_API_KEY``, else the stored key, else a new one.

    Returns the key and whether it differs from the stored one (and so was stored now).
    """
    stored = _read(home / "api-key")
    key = given or environ.get("BINDER_API_KEY") or stored or secrets.token_hex(16)
    if not KEY_RE.match(key):
        raise ConfigError("the API key must be 16 to 256 printable characters without spaces")
    changed = key != stored
    if changed:
        write_private(home / "api-key", key + "\n")
    return key, changed


def proxy_token(home: Path) -> str:
    token = _read(home / "proxy-token")
    if not token:
        token = secrets.token_hex(32)
        write_private(home / "proxy-token", token + "\n")
    return token


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


def mask(value: str) -> str:
    return value[:4] + "…" if len(value) > 8 else "…"
