"""The log aggregator against the real database server."""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from harness import Database, DeployServer, LoggingServer, wait_for
from pymongo import MongoClient

from services.logging import chunks, tail
from services.logging.chunks import MAX_LINES, Followed, read_chunk
from services.logging.sink import AggregatorSink
from services.logging.store import LogStore


@pytest.fixture
def logging_factory(tmp_path: Path, database: Database) -> Iterator[Callable[..., LoggingServer]]:
    servers: list[LoggingServer] = []

    def make(*, db: Database | None = None, start: bool = True, **options: Any) -> LoggingServer:
        server = LoggingServer(tmp_path / f"logging{len(servers)}", db or database, **options)
        server.workdir.mkdir(exist_ok=True)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()


def _post(
    server: LoggingServer,
    records: list[dict[str, Any]] | str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body = records if isinstance(records, str) else json.dumps(records)
    return httpx.post(
        server.url + "/logs",
        content=body,
        headers=server.auth if headers is None else headers,
        timeout=60,
    )


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "not-even-bearer"}],
    ids=["no token", "wrong token", "no scheme"],
)
def test_ingest_and_query_need_the_token(
    logging_factory: Callable[..., LoggingServer], headers: dict[str, str]
) -> None:
    logs = logging_factory()
    forged = [{"service": "deploy-kubernetes", "message": "forged", "time": "2020-01-01T00:00:00Z"}]
    assert _post(logs, forged, headers=headers).status_code == 403
    for path in ("/logs", "/logs/stream"):
        answer = httpx.get(logs.url + path, headers=headers, timeout=10)
        assert answer.status_code == 403
        assert answer.json()["type"] == "unauthorized"
    assert httpx.get(logs.url + "/health", timeout=10).status_code == 200
    assert _post(logs, [{"service": "t", "message": "with the token"}]).status_code == 200
    assert [r["message"] for r in logs.all()] == ["with the token"]


def test_deploy_server_sink_ships_records_queryable_by_app(
    logging_factory: Callable[..., LoggingServer], deploy_factory: Callable[..., DeployServer]
) -> None:
    logs = logging_factory()
    deploy = deploy_factory()
    deploy.logging_token = logs.token
    deploy.config.write_text(
        deploy.config.read_text().replace(
            "[logging]\nport = ", f"[logging]\nport = {logs.port}\n# was "
        )
    )
    deploy.start()
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    records = wait_for(
        lambda: logs.query(app=dep_id, order="oldest")["records"],
        timeout=15,
        what="the deploy server's records",
    )
    assert all(r["id"] == dep_id for r in records)
    assert records[0]["service"] == "deploy-kubernetes"
    wait_for(
        lambda: any(r["message"] == "deployed" for r in logs.query(app=dep_id)["records"]),
        timeout=15,
        what="the 'deployed' line",
    )


def test_filters_and_paging_over_100000_lines(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    logs = logging_factory()
    start = datetime.now(UTC) - timedelta(hours=1)
    services, levels = ("proxy", "db", "deploy-kubernetes", "logging"), ("info", "warning", "error")
    for batch in range(20):
        records = [
            {
                "time": (start + timedelta(milliseconds=batch * 5000 + i)).isoformat(),
                "service": services[i % 4],
                "level": levels[i % 3],
                "message": f"line {batch * 5000 + i}" + (" needle" if i % 1000 == 7 else ""),
                **({"id": "a" * 32} if i % 50 == 0 else {}),
            }
            for i in range(5000)
        ]
        assert _post(logs, records).status_code == 200
    assert len(logs.query(limit=1000)["records"]) == 1000
    needles = logs.all(q="NEEDLE")
    assert len(needles) == 100
    assert all("needle" in r["message"] for r in needles)
    app_lines = logs.all(app="a" * 32)
    assert len(app_lines) == 2000
    assert len({r["rid"] for r in app_lines}) == 2000, "paging returns no line twice"
    times = [r["time"] for r in app_lines]
    assert times == sorted(times, reverse=True), "newest first by default"
    errors_db = logs.query(service="db", level="error", limit=5)["records"]
    assert errors_db
    assert all(r["service"] == "db" and r["level"] in ("error", "critical") for r in errors_db)
    window = logs.all(
        since=(start + timedelta(seconds=10)).isoformat(),
        until=(start + timedelta(seconds=11)).isoformat(),
        service="proxy",
    )
    assert len(window) == 250
    oldest = logs.query(order="oldest", limit=1)["records"][0]
    assert oldest["message"] == "line 0"


def test_live_tail_delivers_a_line_posted_after_it_opened(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    logs = logging_factory()
    got: list[dict[str, Any]] = []
    opened = threading.Event()

    def listen() -> None:
        with httpx.stream(
            "GET",
            logs.url + "/logs/stream",
            params={"service": "web"},
            headers=logs.auth,
            timeout=httpx.Timeout(5, read=20),
        ) as r:
            for line in r.iter_lines():
                opened.set()
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                    return

    thread = threading.Thread(target=listen)
    thread.start()
    assert opened.wait(10)
    _post(
        logs,
        [
            {"service": "other", "message": "not for us"},
            {"service": "web", "message": "hello tail", "level": "warn"},
        ],
    )
    thread.join(20)
    assert [(r["service"], r["message"], r["level"]) for r in got] == [
        ("web", "hello tail", "warning")
    ]


def test_malformed_records_are_refused_and_good_ones_kept(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    logs = logging_factory(max_body_bytes=100_000)
    lines = "\n".join(
        [
            json.dumps({"service": "a", "message": "good 1"}),
            "{broken",
            json.dumps({"service": "a"}),
            json.dumps({"service": "a", "message": "bad level", "level": "loud"}),
            json.dumps({"service": "a", "message": "good 2"}),
        ]
    )
    response = _post(logs, lines)
    assert response.status_code == 422
    body = response.json()
    assert body["accepted"] == 2
    assert [r["index"] for r in body["refused"]] == [1, 2, 3]
    assert "message" in body["refused"][1]["error"]
    assert {r["message"] for r in logs.all(service="a")} == {"good 1", "good 2"}
    big = _post(logs, [{"service": "a", "message": "x" * 60_000}] * 3)
    assert big.status_code == 413


def test_retention_removes_old_lines(logging_factory: Callable[..., LoggingServer]) -> None:
    logs = logging_factory(retention_days=1, retention_check_seconds=0.5)
    old = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    _post(
        logs, [{"service": "r", "message": "old", "time": old}, {"service": "r", "message": "new"}]
    )
    wait_for(
        lambda: [r["message"] for r in logs.all(service="r")] == ["new"],
        timeout=20,
        what="the old line to be removed",
    )


def test_an_ended_apps_output_file_is_removed_once_read_to_its_end(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    logs = logging_factory(start=False, retention_days=1, retention_check_seconds=0.5)
    apps = logs.home / "logs" / "apps"
    ended, running = (secrets.token_hex(16) for _ in range(2))
    # written while no aggregator ran: nothing of it was read, and its last line has no end
    (apps / f"{ended}.log").write_text("started\nlistening\nkilled before the newl")
    (apps / f"{running}.log").write_text("serving\n")
    two_days_ago = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    os.utime(apps / f"{ended}.log", (two_days_ago, two_days_ago))
    logs.start()
    wait_for(lambda: not (apps / f"{ended}.log").exists(), timeout=20, what="the file removed")
    lines = [r["message"] for r in logs.all(app=ended, order="oldest")]
    assert lines == ["started", "listening", "killed before the newl"]  # none lost
    wait_for(lambda: len(logs.all(app=running)) == 1, timeout=20, what="the running app's line")
    assert (apps / f"{running}.log").exists()  # written to within retention_days: kept


def test_program_output_followed_through_rotation(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    logs = logging_factory()
    path = logs.home / "logs" / "worker.out.log"
    with path.open("a") as fh:
        fh.write("before 1\nbefore 2\n")
    wait_for(lambda: len(logs.all(service="worker")) == 2, timeout=15, what="the first lines")
    with path.open("a") as fh:
        fh.write("before 3\n")
    path.rename(path.with_name("worker.out.log.1"))  # as supervisord rotates
    with path.open("a") as fh:
        fh.write("after 1\n")
    wait_for(lambda: len(logs.all(service="worker")) == 4, timeout=15, what="lines across rotation")
    # a restarted aggregator goes on where it left off: no line twice
    logs.stop()
    with path.open("a") as fh:
        fh.write("after 2\n")
    logs.start()
    wait_for(
        lambda: len(logs.all(service="worker")) == 5, timeout=15, what="the line after restart"
    )
    messages = sorted(r["message"] for r in logs.all(service="worker"))
    assert messages == ["after 1", "after 2", "before 1", "before 2", "before 3"]


def test_app_output_followed_promptly_also_in_a_folder_made_again(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    """Lines are seen within seconds of being written (well before the slow safety rescan),
    in an app folder removed and made again while the aggregator runs too."""
    logs = logging_factory()
    apps = logs.home / "logs" / "apps"
    (apps / "first.log").write_text("one\n")
    wait_for(lambda: len(logs.all(app="first")) == 1, timeout=5, what="the first app's line")
    (apps / "first.log").unlink()
    apps.rmdir()
    apps.mkdir()
    with (apps / "second.log").open("a") as fh:
        fh.write("two\n")
    wait_for(lambda: len(logs.all(app="second")) == 1, timeout=5, what="a line in the new folder")
    with (apps / "second.log").open("a") as fh:
        fh.write("three\n")
    wait_for(lambda: len(logs.all(app="second")) == 2, timeout=5, what="a line appended")


def test_aggregator_killed_while_sink_logs_loses_and_duplicates_nothing(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    logs = logging_factory()
    sink = AggregatorSink(logs.url, token=logs.token)
    total = 3000
    for n in range(total):
        sink.push(
            {
                "time": datetime.now(UTC).isoformat(),
                "service": "s",
                "level": "info",
                "message": f"m{n}",
            }
        )
        if n == 1000:
            logs.kill9()
        if n == 2000:
            logs.start()
    sink.close(timeout=60)
    assert sink.pending() == 0
    assert sink.dropped == 0
    messages = [r["message"] for r in logs.all(service="s")]
    assert len(messages) == total
    assert set(messages) == {f"m{n}" for n in range(total)}


def test_a_sink_with_a_wrong_token_counts_its_records_dropped(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    logs = logging_factory()
    sink = AggregatorSink(logs.url, token="wrong")
    sink.push({"time": datetime.now(UTC).isoformat(), "service": "w", "message": "lost"})
    sink.close(timeout=10)
    assert (sink.pending(), sink.dropped) == (0, 1)
    assert logs.all(service="w") == []


def _writes(client: MongoClient[dict[str, Any]]) -> int:
    """Insert and update commands the database server has run (a many-document one counts 1)."""
    counters = client.admin.command("serverStatus")["opcounters"]
    return int(counters["insert"]) + int(counters["update"])


def _messages_by_app(logs: LoggingServer) -> dict[str, list[str]]:
    by_app: dict[str, list[str]] = {}
    for record in logs.all(service="app"):
        by_app.setdefault(record["id"], []).append(record["message"])
    return {app: sorted(messages) for app, messages in by_app.items()}


def test_many_app_files_written_at_once_cost_a_few_database_writes(
    logging_factory: Callable[..., LoggingServer], own_db: Database
) -> None:
    """Twenty apps starting at once: each line stored once, in a few database writes for all
    (not three operations per file), and a restarted aggregator stores none of them again."""
    logs = logging_factory(db=own_db)
    apps = logs.home / "logs" / "apps"
    expected = {f"app{n:02}": sorted(f"app{n:02} line {i}" for i in range(3)) for n in range(20)}
    with MongoClient[dict[str, Any]](own_db.uri, serverSelectionTimeoutMS=5000) as client:
        offsets = client[logs.database]["log_offsets"]
        before = _writes(client)
        for app, lines in expected.items():
            (apps / f"{app}.log").write_text("".join(line + "\n" for line in lines))
        wait_for(
            lambda: offsets.count_documents({}) == 20, timeout=15, what="the 20 files' offsets"
        )
        writes = _writes(client) - before
        assert _messages_by_app(logs) == expected
        assert writes <= 6, f"{writes} database writes for 20 files"
        logs.stop()
        with (apps / "app00.log").open("a") as fh:
            fh.write("after restart\n")
        logs.start()
        wait_for(lambda: len(logs.all(app="app00")) == 4, timeout=15, what="the line after restart")
        expected["app00"] = sorted([*expected["app00"], "after restart"])
        assert _messages_by_app(logs) == expected


def test_a_chunk_stored_without_its_offset_is_not_stored_again(
    logging_factory: Callable[..., LoggingServer], database: Database
) -> None:
    """As after a crash between storing a chunk and its offset: the tailer finds the chunk
    stored, stores none of its lines again and goes on reading where it ended."""
    logs = logging_factory(start=False)
    path = logs.home / "logs" / "apps" / "crashed.log"
    path.write_text("one\ntwo\n")
    chunk = read_chunk(path=path, key=str(path), state=Followed(path.stat().st_ino, 0), final=False)
    assert chunk is not None

    async def store_chunk() -> None:
        store = LogStore(uri=database.uri, database=logs.database)
        try:
            assert await store.insert_chunks([chunk]) == {}
        finally:
            await store.close()

    anyio.run(store_chunk)
    with path.open("a") as fh:
        fh.write("three\n")
    logs.start()
    wait_for(lambda: len(logs.all(app="crashed")) >= 3, timeout=15, what="the line after it")
    with path.open("a") as fh:
        fh.write("four\n")
    wait_for(lambda: len(logs.all(app="crashed")) >= 4, timeout=15, what="a line appended")
    assert _messages_by_app(logs) == {"crashed": ["four", "one", "three", "two"]}


def test_a_file_longer_than_a_chunk_is_stored_whole_along_with_the_others(
    logging_factory: Callable[..., LoggingServer], database: Database
) -> None:
    # an app's share of the aggregator above the file's lines: the chunks are what is checked
    logs = logging_factory(app_lines_per_second=10**6, app_bytes_per_second=10**9)
    apps = logs.home / "logs" / "apps"
    lines = MAX_LINES * 2 + 5
    (apps / "long.log").write_text("".join(f"l{n}\n" for n in range(lines)))
    (apps / "short.log").write_text("s\n")
    with MongoClient[dict[str, Any]](database.uri, serverSelectionTimeoutMS=5000) as client:
        db = client[logs.database]

        def both_offsets() -> dict[str, int] | None:
            found = {d["_id"]: d["offset"] for d in db["log_offsets"].find()}
            return found if len(found) == 2 else None

        offsets = wait_for(both_offsets, timeout=30, what="both files' offsets")
        stored = [line for b in db["log_buckets"].find({"id": "long"}) for line in b["lines"]]
    assert offsets == {
        str(apps / "long.log"): (apps / "long.log").stat().st_size,
        str(apps / "short.log"): 2,
    }
    assert len(stored) == lines
    assert {line["message"] for line in stored} == {f"l{n}" for n in range(lines)}
    assert [r["message"] for r in logs.all(app="short")] == ["s"]


def test_a_line_no_document_can_hold_stops_nothing(
    logging_factory: Callable[..., LoggingServer],
) -> None:
    """A JSON line of a program's log whose escapes make a lone surrogate (which BSON cannot
    encode) is stored mended, and the files read with it in the same round are stored too. (An
    app's lines are never parsed: its escapes stay text.)"""
    logs = logging_factory()
    (logs.home / "logs" / "hostile.out.log").write_text('{"message": "x \\ud800 y"}\nafter\n')
    (logs.home / "logs" / "apps" / "beside.log").write_text("beside\n")
    wait_for(
        lambda: len(logs.all(service="hostile")) == 2 and len(logs.all(service="app")) == 1,
        timeout=15,
        what="all three lines",
    )
    assert sorted(r["message"] for r in logs.all(service="hostile")) == ["after", "x ? y"]
    assert _messages_by_app(logs) == {"beside": ["beside"]}


def test_a_round_is_bounded_and_the_next_goes_on_at_once(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However much a file holds, a round reads a bounded number of chunks; the rest is read by
    the rounds that follow, without waiting for the file to change again."""
    monkeypatch.setattr(chunks, "MAX_LINES", 10)
    monkeypatch.setattr(tail, "ROUND_PASSES", 2)
    logs_dir = tmp_path / "logs"
    (logs_dir / "apps").mkdir(parents=True)
    path = logs_dir / "apps" / "busy.log"
    path.write_text("".join(f"line {n}\n" for n in range(95)))
    fed: list[dict[str, Any]] = []

    async def feed(records: list[dict[str, Any]]) -> None:
        fed.extend(records)

    async def rounds() -> list[int]:
        store = LogStore(uri=database.uri, database=f"rounds{secrets.token_hex(4)}")
        await store.open()
        tailer = tail.Tailer(logs_dir=logs_dir, store=store, sink=feed)
        try:
            counts = [await tailer.follow([path])]
            while tailer.pending():
                counts.append(await tailer.follow(sorted(tailer.pending())))
            return counts
        finally:
            await store.close()

    counts = anyio.run(rounds)
    assert counts[0] == 20  # two passes of ten lines
    assert sum(counts) == 95
    assert [r["message"] for r in fed] == [f"line {n}" for n in range(95)]


def test_a_frozen_database_delays_lines_without_losing_or_doubling_any(
    logging_factory: Callable[..., LoggingServer], own_db: Database
) -> None:
    """While the database does not answer, the lines wait in their files; once it answers,
    each is stored once, and the aggregator says so in its log instead of crashing a loop."""
    logs = logging_factory(db=own_db)
    path = logs.home / "logs" / "worker.out.log"
    with path.open("a") as fh:
        fh.write("before\n")
    wait_for(lambda: len(logs.all(service="worker")) == 1, timeout=15, what="the first line")
    own_db.freeze()
    try:
        with path.open("a") as fh:
            fh.write("".join(f"during {n}\n" for n in range(50)))
        wait_for(
            lambda: "storing log lines failed" in (logs.workdir / "logging.log").read_text(),
            timeout=60,
            what="the aggregator to say it cannot store lines",
        )
    finally:
        own_db.thaw()
    wait_for(lambda: len(logs.all(service="worker")) == 51, timeout=60, what="the lines stored")
    messages = sorted(r["message"] for r in logs.all(service="worker"))
    assert messages == sorted(["before", *(f"during {n}" for n in range(50))])
    wait_for(
        lambda: "log lines stored again" in (logs.workdir / "logging.log").read_text(),
        timeout=15,
        what="the aggregator to say lines are stored again",
    )
    assert "crashed" not in (logs.workdir / "logging.log").read_text()
