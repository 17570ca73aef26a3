"""Driving supervisord over its XML-RPC interface on the suite's unix socket."""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import Faults, SupervisorTransport

from common.errors import BinderError
from common.processes import alive
from control.secrets import SECRET_NAMES


class ControlError(BinderError):
    type = "controlError"


class Supervisor:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.socket = home / "supervisor.sock"
        self.conf = home / "supervisord.conf"

    def _raw(self, method: str, *args: Any) -> Any:
        """Call ``method`` on a fresh connection (the transport's kept-alive one is unusable after
        a failure), closed afterwards whatever happens."""
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        target: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            for part in method.split("."):
                target = getattr(target, part)
            return target(*args)
        finally:
            transport.close()

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return self._raw(method, *args)
        except xmlrpc.client.Fault as exc:
            raise ControlError(f"supervisord refused {method}{args}: {exc.faultString}") from exc
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise ControlError(f"supervisord is not running ({self.socket}): {exc}") from exc

    def running(self) -> bool:
        try:
            return bool(self._raw("supervisor.getState")["statecode"] == 1)
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            return False

    def pid(self) -> int | None:
        try:
            return int((self.home / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def start_daemon(self, *, timeout: float = 15.0) -> None:
        """Start supervisord on the rendered config and wait for its socket to answer."""
        supervisord = Path(sys.executable).parent / "supervisord"
        # secrets reach programs through control.launch only, never supervisord's environment
        env = {k: v for k, v in os.environ.items() if k not in SECRET_NAMES}
        result = subprocess.run(
            [str(supervisord), "-c", str(self.conf)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise ControlError(
                f"supervisord did not start: {result.stderr.strip() or result.stdout}"
            )
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                raise ControlError("supervisord started but its socket does not answer")
            time.sleep(0.02)

    def update(self) -> list[str]:
        """Reload the config file; restart only the programs whose section changed."""
        added, changed, removed = self._call("supervisor.reloadConfig")[0]
        for name in [*changed, *removed]:
            with contextlib.suppress(ControlError):
                self._call("supervisor.stopProcess", name, True)
            self._call("supervisor.removeProcessGroup", name)
        for name in [*changed, *added]:
            self._call("supervisor.addProcessGroup", name)
        return sorted({*added, *changed, *removed})

    def info(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self._raw("supervisor.getProcessInfo", name))
        except xmlrpc.client.Fault as exc:
            if exc.faultCode == Faults.BAD_NAME:
                return None
            raise ControlError(f"supervisord: {exc.faultString}") from exc
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError):
            return None

    def all_info(self) -> list[dict[str, Any]]:
        try:
            return [dict(i) for i in self._raw("supervisor.getAllProcessInfo")]
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            return []

    def start(self, name: str) -> None:
        try:
            self._raw("supervisor.startProcess", name, False)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode != Faults.ALREADY_STARTED:
                raise ControlError(f"could not start {name}: {exc.faultString}") from exc

    def stop(self, name: str) -> None:
        try:
            self._raw("supervisor.stopProcess", name, True)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode not in (Faults.NOT_RUNNING, Faults.BAD_NAME):
                raise ControlError(f"could not stop {name}: {exc.faultString}") from exc
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError):
            return

    def stderr_tail(self, name: str, length: int = 4000) -> str:
        try:
            text, _, _ = self._raw("supervisor.tailProcessStderrLog", name, 0, length)
            return str(text)
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            return ""

    def shutdown(self, *, timeout: float = 15.0) -> None:
        pid = self.pid()
        with contextlib.suppress(ControlError):
            self._call("supervisor.shutdown")
        deadline = time.monotonic() + timeout
        while pid is not None and alive(pid):
            if time.monotonic() > deadline:
                raise ControlError(f"supervisord (pid {pid}) did not exit within {timeout:g} s")
            time.sleep(0.02)
