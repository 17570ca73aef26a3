"""The systemd unit that runs the suite's supervisord in the foreground."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_HOME = Path("~/.binder")


def unit_path(home: Path) -> Path:
    """Where the unit of ``home`` is installed: ``binder.service`` for the default home, and
    ``binder-<digest of the home's path>.service`` for any other, so two homes on one host
    have two units."""
    if home.resolve() == DEFAULT_HOME.expanduser().resolve():
        return UNIT_DIR / "binder.service"
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    return UNIT_DIR / f"binder-{digest}.service"


def unit_text(*, home: Path, binder_control: Path) -> str:
    supervisord = Path(sys.executable).parent / "supervisord"
    return f"""[Unit]
Description=Binder launch service (supervisord and the suite)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
# secrets (the API key, the proxy token) come from an owner-only file, never the command line
EnvironmentFile={home}/secrets.env
Environment=BINDER_HOME={home}
ExecStart={supervisord} -n -c {home}/supervisord.conf
# start the services in order, each awaited until ready
ExecStartPost={binder_control} --home {home} start-all
ExecStop={binder_control} --home {home} stop-all
Restart=always
RestartSec=3
TimeoutStartSec=180
KillMode=mixed

[Install]
WantedBy=multi-user.target
"""
