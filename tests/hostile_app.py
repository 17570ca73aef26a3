"""A hostile app for the isolation tests: a notebook-like web app that runs any shell command it
is sent, as a stranger's notebook can.

``python tests/hostile_app.py --port PORT --base-url /user/<id>/ [--host H]``: ``GET <base>``
answers 200; ``POST <base>run`` with a shell script as its body runs it (``/bin/sh -c``) and
answers ``{"code", "out", "err"}`` as JSON once it ends (at most ``X-Timeout`` seconds, 60 by
default); with ``X-Output: app`` the script's output goes to the app's own (its log) instead of
the answer. Standard library only, like the example app.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(base: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0].startswith(base.rstrip("/")):
                self._send(200, b"hostile app\n")
            else:
                self._send(404, b"not found\n")

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != base + "run":
                self._send(404, b"not found\n")
                return
            script = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            timeout = float(self.headers.get("X-Timeout", "60"))
            captured = self.headers.get("X-Output") != "app"
            try:
                done = subprocess.run(
                    ["/bin/sh", "-c", script], capture_output=captured, timeout=timeout, check=False
                )
                result = {
                    "code": done.returncode,
                    "out": (done.stdout or b"").decode(errors="replace"),
                    "err": (done.stderr or b"").decode(errors="replace"),
                }
            except subprocess.TimeoutExpired:
                result = {"code": None, "out": "", "err": f"timed out after {timeout} s"}
            except OSError as exc:
                result = {"code": None, "out": "", "err": str(exc)}
            self._send(200, json.dumps(result).encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", default="/")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    base = "/" + args.base_url.strip("/") + "/" if args.base_url.strip("/") else "/"
    server = ThreadingHTTPServer((args.host, args.port), make_handler(base))
    server.daemon_threads = True
    print(f"hostile app serving {base} on {args.host}:{args.port}", flush=True)
    server.serve_forever(poll_interval=0.5)


if __name__ == "__main__":
    main()
