"""The ``example`` template's app: a small web page served under its base URL.

Standard library only, so it starts in a few tens of milliseconds on any host.
Usage: ``python -m services.example_app --port PORT --base-url /user/<id>/ [--delay SECONDS]``.
Requests are logged one line each, except the deploy server's readiness probes (known by their
``User-Agent``): a slow start must not fill the log with one line per probe.
"""

from __future__ import annotations

import argparse
import html
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROBE_AGENT = "binder-readiness"
"""The ``User-Agent`` prefix of the deploy server's readiness probes and route checks
(``common.proxy.PROBE_AGENT``; not imported: this app needs nothing but the standard library)."""


def make_handler(base_url: str, greeting: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == base_url.rstrip("/"):
                self._send(302, b"", location=base_url)
            elif path.startswith(base_url):
                page = (
                    f"<!doctype html><title>Binder example</title><h1>{html.escape(greeting)}</h1>"
                    f"<p>Deployment {html.escape(os.environ.get('BINDER_ID', ''))}, "
                    f"path {html.escape(path)}</p>"
                ).encode()
                self._send(200, page)
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, location: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            if location:
                self.send_header("Location", location)
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if not self.headers.get("User-Agent", "").startswith(PROBE_AGENT):
                super().log_request(code, size)

        def log_message(self, format: str, *args: object) -> None:
            sys.stdout.write(f"{self.address_string()} {format % args}\n")

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", default="/")
    parser.add_argument("--host", default=os.environ.get("EXAMPLE_HOST", "127.0.0.1"))
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="seconds to wait before listening (a slow start, as of a server loading extensions)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(args.delay)
    base = "/" + args.base_url.strip("/") + "/" if args.base_url.strip("/") else "/"
    greeting = os.environ.get("EXAMPLE_GREETING", "Hello from Binder")
    server = ThreadingHTTPServer((args.host, args.port), make_handler(base, greeting))
    server.daemon_threads = True
    print(f"serving {base} on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
