"""The ``db`` program when no ``mongod`` is installed: the embedded MongoDB-compatible server.

Run as its own process (``python -m services.embedded_db --host H --port P --storage-path DIR``);
the services only ever speak the wire protocol to it. It differs from ``secantusd-py`` in these
ways: every write that asks for a journaled write concern (``j=true``, as all of the suite's
writers do) is flushed to disk before it is acknowledged; a write that does not ask may be lost by
a kill -9 (``--sync-on-commit`` flushes every commit, at about twice the cost of an insert: see
``scripts/bench db``); on
SIGTERM it wakes the server's accept loop with a connection, so it stops in a few tens of
milliseconds instead of waiting out the accept thread's two-second join; a transaction its client
left behind is rolled back after :data:`TRANSACTION_LIFETIME_SECONDS`; and with ``--auth`` it
provisions the user named in ``BINDER_DB_URI`` (an environment variable, never an argument) before
it listens, then requires SCRAM-SHA-256 authentication of every client, and keeps strangers from
the connections the suite needs (:class:`GuardedConnections`).

Multi-document transactions are journaled too (:func:`journal_transactions`): the server commits
them without flushing its log whatever ``commitTransaction``'s write concern asks (its single
writes honour ``j``), so a kill -9 lost transactions it had acknowledged (measured: the store
contract's restart test lost a record inserted in a transaction). That function replaces the
commit of the server's transaction registry, a private attribute of ``secantusdb`` 0.7.0b3 (the
version ``pyproject.toml`` pins); ``tests/integration/test_store_contract.py`` (writes across a
kill -9 of the database) holds its reason. Exit condition: delete it when the server honours
``commitTransaction``'s ``j``.

Its change streams skip the writes their ``$match`` leaves out before making events of them
(:func:`follow_only_matched_collections`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

from secantus import SecantusDBServer
from secantus import commands as server_commands
from secantus.auth import SCRAM_SHA_256, derive_credentials
from secantus.connreg import ConnectionRegistry

from common.peers import peer_uid

log = logging.getLogger("embedded_db")
SAY_EVERY_SECONDS = 10.0
"""Connections cut are logged at most this often (a flood would fill the log otherwise)."""
TRANSACTION_LIFETIME_SECONDS = 5.0
"""A transaction idle this long is rolled back (the server's default is 60 s, as mongod's
``transactionLifetimeLimitSeconds``). A transaction outlives its client (a connection's close
does not end it): a deploy server killed with -9 inside one left the documents it wrote locked,
and every delete that counts a deployment out conflicted with it for a minute (seen in
``scripts/chaos``). The suite's transactions last milliseconds, and each of their statements
gives up after 4 s (the store's ``timeoutMS``), so one idle for 5 s has no client left waiting
on it; a client that is there after all finds it rolled back, a transient error it runs again."""


def _wake(host: str, port: int, done: threading.Event) -> None:
    """Connect until the listening socket is gone, so a blocked accept() returns."""
    while not done.is_set():
        try:
            with socket.create_connection((host, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.005)


class GuardedConnections(ConnectionRegistry):  # type: ignore[misc]  # secantus is untyped
    """The server's connection registry, which also keeps strangers from filling its slots.

    SecantusDB serves at most ``max_connections`` clients (1,000), a thread each, and keeps a
    silent one for ``client_idle_timeout_s`` (300 s): other programs of the host could hold every
    slot without a password, and the suite could not connect. A connection is a stranger's when
    the socket at its other end is not of the server's own user (another user's program, or
    another host: :func:`common.peers.peer_uid`). A stranger must authenticate within
    ``deadline`` seconds, or it is cut; at most ``max_strangers`` strangers wait to authenticate
    at once, and one more is cut at once. The suite's own clients (its user's) are never cut:
    their pooled monitoring connections never authenticate, as drivers do.

    It replaces ``SecantusDBServer.connections`` (a public attribute the accept loop registers each
    connection with, and whose ``authenticate`` SCRAM calls on success); ``secantusdb`` is pinned
    to the version this was checked with in ``pyproject.toml``, and ``tests/integration/
    test_connection_bounds.py`` holds what it exists for. Exit condition: delete it when the
    server bounds unauthenticated connections itself (a deadline and a cap of its own)."""

    def __init__(self, *, deadline: float, max_strangers: int) -> None:
        super().__init__()
        self.deadline = deadline
        self.max_strangers = max_strangers
        self._uid = os.geteuid()
        self._strangers: dict[int, float] = {}
        """Connections of strangers not yet authenticated, and when each is cut."""
        self._changed = threading.Condition()
        self._cut = 0
        self._said_at = 0.0
        threading.Thread(target=self._cut_late, name="auth-deadline", daemon=True).start()

    def open(self, peer_addr: tuple[str, int], sock: socket.socket | None = None) -> int:
        conn_id = int(super().open(peer_addr, sock))
        if sock is None or self._own(sock):
            return conn_id
        with self._changed:
            full = len(self._strangers) >= self.max_strangers
            if not full:
                self._strangers[conn_id] = time.monotonic() + self.deadline
                self._changed.notify()
        if full:
            self._cut_one(conn_id, f"{self.max_strangers} others wait to authenticate")
        return conn_id

    def authenticate(self, conn_id: int, user: str) -> None:
        super().authenticate(conn_id, user)
        with self._changed:
            self._strangers.pop(conn_id, None)

    def close(self, conn_id: int) -> None:
        super().close(conn_id)
        with self._changed:
            self._strangers.pop(conn_id, None)

    def _own(self, sock: socket.socket) -> bool:
        try:
            return peer_uid(sock) == self._uid
        except OSError:  # gone already, or no answer from the kernel: a stranger
            return False

    def _cut_one(self, conn_id: int, why: str) -> None:
        self.kill(conn_id)
        self._cut += 1
        now = time.monotonic()
        if now - self._said_at >= SAY_EVERY_SECONDS:  # one line a while, however many
            self._said_at = now
            log.warning(
                "cut %d unauthenticated connections of other users or hosts so far (last: %s)",
                self._cut,
                why,
            )

    def _cut_late(self) -> None:
        while True:
            with self._changed:
                while not self._strangers:
                    self._changed.wait()
                first = min(self._strangers.values())
                self._changed.wait(max(0.0, first - time.monotonic()))
                now = time.monotonic()
                late = [c for c, at in self._strangers.items() if at <= now]
                for conn_id in late:
                    del self._strangers[conn_id]
            for conn_id in late:
                self._cut_one(conn_id, f"not authenticated within {self.deadline:g} s")


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


class _SyncedCommits:
    """A WiredTiger session whose commits flush the log to disk (``sync=on``)."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def commit_transaction(self, config: str | None = None) -> Any:
        return self._session.commit_transaction("sync=on")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def journal_transactions(server: SecantusDBServer) -> None:
    """Make every multi-document transaction's commit durable before it is acknowledged."""
    registry = server.transactions
    commit: Callable[[Any], None] = registry._commit

    def durable(txn: Any) -> None:
        handle = getattr(txn, "handle", None)
        if handle is not None and not isinstance(handle.session, _SyncedCommits):
            handle.session = _SyncedCommits(handle.session)
        commit(txn)

    registry._commit = durable


CATALOG_WRITERS = (
    "create_index",
    "drop_index",
    "drop_all_indexes",
    "set_index_expiry",
    "set_index_options",
    "drop_collection",
    "drop_database",
    "rename_collection",
    "_recover_pending_drops_locked",
)
"""The storage's methods that write its index catalog, besides ``_maybe_mark_multikey``
(``tests/integration/test_embedded_db.py`` holds the list to the pinned version's source)."""


class IndexCatalog:
    """The storage's index catalog (each collection's indexes and their options), read once per
    collection and kept until an index or a collection changes, rather than read from its table
    at every look.

    The server's storage reads a collection's catalog from its WiredTiger table and decodes it
    each time it needs it: several times per write (to choose an index, to keep each one, to
    check the unique ones), about sixty reads per update of a record with the suite's indexes.
    Measured on the store's own writes (``update_one`` moving a record, ``insert_many`` of
    progress, admissions): a move costs the server 1.03 ms of CPU with those reads and 0.52 ms
    without; an admission 1.43 and 1.10 ms; a progress insert 0.23 and 0.15 ms.

    It replaces, on the one ``Storage`` object, ``_iter_indexes`` (the catalog's one reader) and
    wraps each method that writes the catalog (:data:`CATALOG_WRITERS`): the kept catalogs are
    dropped before and after each such write, and a reading that a write overlapped is not kept
    (a generation counter). A collection where an index becomes multikey (a document with an
    array on an indexed field: ``_maybe_mark_multikey`` writes the mark inside the document's own
    transaction) is not kept any more, so no reader keeps a catalog its transaction may roll
    back. Private methods of ``secantusdb`` 0.7.0b3 (pinned in ``pyproject.toml``); the test
    holds their list to the source. Exit condition: delete it when the server keeps its catalog
    in memory itself."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self._read: Callable[[str, str], Any] = storage._iter_indexes
        self._kept: dict[tuple[str, str], list[Any]] = {}
        self._uncached: set[tuple[str, str]] = set()
        self._generation = 0
        self._lock = threading.Lock()

    def install(self) -> None:
        storage = self._storage
        storage._iter_indexes = self._iter_indexes
        for name in CATALOG_WRITERS:
            setattr(storage, name, self._writing(getattr(storage, name)))
        mark: Callable[..., set[str]] = storage._maybe_mark_multikey

        def mark_multikey(db: str, coll: str, *args: Any) -> set[str]:
            marked = mark(db, coll, *args)
            if marked:
                with self._lock:
                    self._uncached.add((db, coll))
                    self._forget()
            return marked

        storage._maybe_mark_multikey = mark_multikey

    def _forget(self) -> None:
        self._generation += 1
        self._kept.clear()

    def _iter_indexes(self, db: str, coll: str) -> Any:
        key = (db, coll)
        kept = self._kept.get(key)
        if kept is None:
            generation = self._generation
            kept = list(self._read(db, coll))
            with self._lock:
                if generation == self._generation and key not in self._uncached:
                    self._kept[key] = kept
        # copies: a caller may change what it is given, and the kept rows are never handed out
        return ((name, dict(spec), dict(options)) for name, spec, options in kept)

    def _writing(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._forget()
            try:
                return write(*args, **kwargs)
            finally:
                with self._lock:
                    self._forget()

        return wrapper


def followed_collections(stages: list[Any]) -> frozenset[str] | None:
    """The collections a change stream's events can come from, when the first stage after its
    ``$changeStream`` says so: a ``$match`` whose ``ns.coll`` is one name or ``$in`` a list of
    names (a ``$match``'s conditions all hold at once); None otherwise."""
    if not stages or not isinstance(stages[0], Mapping) or set(stages[0]) != {"$match"}:
        return None
    match = stages[0]["$match"]
    named = match.get("ns.coll") if isinstance(match, Mapping) else None
    if isinstance(named, str):
        return frozenset({named})
    if isinstance(named, Mapping) and set(named) == {"$in"}:
        names = named["$in"]
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return frozenset(names)
    return None


class _FollowedOplog:
    """The storage, as a change stream sees it: its oplog scans skip the writes to collections
    the stream's ``$match`` leaves out (commands on the database, ``<db>.$cmd``, are kept)."""

    def __init__(self, storage: Any, collections: frozenset[str]) -> None:
        self._storage = storage
        self._collections = collections

    def read_oplog_scan(
        self, *, start_seq: int, limit: int, ns_filter: Callable[[str], bool] | None = None
    ) -> Any:
        def followed(ns: str) -> bool:
            _, dot, coll = ns.partition(".")
            if dot and not coll.startswith("$cmd") and coll not in self._collections:
                return False
            return ns_filter is None or ns_filter(ns)

        return self._storage.read_oplog_scan(start_seq=start_seq, limit=limit, ns_filter=followed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def follow_only_matched_collections() -> None:
    """Change streams of a database skip the writes to collections their ``$match`` leaves out
    (:func:`followed_collections`) before those writes are made into events.

    The server makes every write of the watched database into a change event (with
    ``updateLookup``, a read of the document too), then runs the stream's pipeline over the
    events. Each deploy server follows the records, the progress and the templates, and the
    database holds more: counters, launch windows, leases, heartbeats, log lines. Per launch in a
    burst of 10 with two deploy servers, the server made 17 events (8.6 per stream) and its
    streams' work was a quarter of its CPU, its ``$match`` over the events as much as the
    events' making (yappi). An update of a counter cost the server 0.66-0.86 ms of CPU with no
    stream open, 1.33-1.52 ms with two deploy servers' streams, and 0.73-1.03 ms with those
    streams narrowed (2,000 updates each way, measured).

    It replaces ``_aggregate_change_stream`` of the server's commands, a private function of
    ``secantusdb`` 0.7.0b3 (pinned), with one that gives it the storage as
    :class:`_FollowedOplog`; ``tests/integration/test_embedded_db.py`` holds what it relies on
    to the source. Exit condition: delete it when the server filters by namespace before it
    makes events."""
    aggregate: Callable[..., Any] = server_commands._aggregate_change_stream

    def followed_only(doc: Any, ctx: Any, coll: Any, pipeline: list[Any], batch_size: int) -> Any:
        collections = followed_collections(pipeline[1:])
        if collections is not None:
            ctx = dataclasses.replace(ctx, storage=_FollowedOplog(ctx.storage, collections))
        return aggregate(doc, ctx, coll, pipeline, batch_size)

    server_commands._aggregate_change_stream = followed_only


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
        "--auth-deadline",
        type=float,
        default=10.0,
        help="with --auth: seconds in which a client of another user or host must authenticate",
    )
    parser.add_argument(
        "--max-unauthenticated",
        type=int,
        default=32,
        help="with --auth: clients of other users or hosts waiting to authenticate at once",
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
        transaction_lifetime_seconds=TRANSACTION_LIFETIME_SECONDS,
    )
    journal_transactions(server)
    IndexCatalog(server.storage).install()
    follow_only_matched_collections()
    if args.auth:
        user = provision_user(server, os.environ.get("BINDER_DB_URI", ""))
        server.connections = GuardedConnections(
            deadline=args.auth_deadline, max_strangers=args.max_unauthenticated
        )
        log.info("authentication required; user %s provisioned", user)
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        waker = threading.Thread(target=_wake, args=(args.host, args.port, done), daemon=True)
        waker.start()
        server.stop()
        done.set()
        log.info("stopped on signal %d", signum)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gc.freeze()  # what starting made lives as long as the server: out of the collector's scans
    server.start()
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
