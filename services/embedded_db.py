"""The ``db`` program when no ``mongod`` is installed: the embedded MongoDB-compatible server.

Run as its own process (``python -m services.embedded_db --host H --port P --storage-path DIR``);
the services only ever speak the wire protocol to it. It differs from ``secantusd-py`` in three
ways: every write that asks for a journaled write concern (``j=true``, as all of the suite's
writers do) is flushed to disk before it is acknowledged; a write that does not ask may be lost by
a kill -9 (``--sync-on-commit`` flushes every commit, at about twice the cost of an insert: see
``scripts/bench db``); on
SIGTERM it wakes the server's accept loop with a connection, so it stops in a few tens of
milliseconds instead of waiting out the accept thread's two-second join; and with ``--auth`` it
provisions the user named in ``BINDER_DB_URI`` (an environment variable, never an argument) before
it listens, then requires SCRAM-SHA-256 authentication of every client.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from urllib.parse import unquote, urlsplit

from secantus import SecantusDBServer
from secantus.auth import SCRAM_SHA_256, derive_credentials


def _wake(host: str, port: int, done: threading.Event) -> None:
    """Connect until the listening socket is gone, so a blocked accept() returns."""
    while not done.is_set():
        try:
            with socket.create_connection((host, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.005)


def provision_user(server: SecantusDBServer, uri: str) -> str:
    """Create (or update, so a new password takes effect) the user with the credentials of
    ``uri``, with the ``root`` role, directly in the server's storage before it listens: no
    client ever reaches it without authentication. Returns the user's name."""
    parts = urlsplit(uri)
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    if not user or not password:
        raise SystemExit("embedded_db: --auth needs BINDER_DB_URI with a user and a password")
    record = {
        "_id": f"admin.{user}",
        "user": user,
        "db": "admin",
        "credentials": derive_credentials(password, username=user).to_doc(),
        "roles": [{"role": "root", "db": "admin"}],
        "mechanisms": [SCRAM_SHA_256],
    }
    server.storage.add_user("admin", user, record, replace=True)
    return user


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.embedded_db", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=27017)
    parser.add_argument("--storage-path", required=True)
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require authentication; the user and password come from BINDER_DB_URI",
    )
    parser.add_argument(
        "--sync-on-commit",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="flush the journal to disk before acknowledging every write (default: off; "
        "writes asking for it, with the write concern j=true as the suite's do, always are)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = SecantusDBServer(
        host=args.host,
        port=args.port,
        storage_path=args.storage_path,
        require_auth=args.auth,
        sync_on_commit=args.sync_on_commit,
        enable_test_commands=False,  # no fail points or test commands on the suite's data
    )
    if args.auth:
        user = provision_user(server, os.environ.get("BINDER_DB_URI", ""))
        logging.getLogger("embedded_db").info("authentication required; user %s provisioned", user)
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        waker = threading.Thread(target=_wake, args=(args.host, args.port, done), daemon=True)
        waker.start()
        server.stop()
        done.set()
        logging.getLogger("embedded_db").info("stopped on signal %d", signum)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
