"""The log aggregator: ingest, query, live tail, file following, retention.

Ingest and query require ``Authorization: Bearer <token>`` (``BINDER_LOGGING_TOKEN``); ``/health``
and ``/metrics`` are open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.background import LoopSupervisor, repeat
from common.errors import BinderError, MalformedRequestError, UnauthorizedError
from common.settings import Settings
from common.web import EXCEPTION_HANDLERS, metrics_response, read_body
from services.logging.ingest import LogFilters, parse_body, parse_filters, to_wire
from services.logging.quota import AppQuota
from services.logging.store import LogStore
from services.logging.tail import Tailer

MAX_LIMIT = 1000
STREAM_QUEUE = 10_000
DB_LOOK_EVERY_SECONDS = 1.0
DB_LOOK_DEADLINE_SECONDS = 1.5


class Aggregator:
    def __init__(
        self,
        *,
        store: LogStore,
        settings: Settings,
        retention_interval: float = 60.0,
    ) -> None:
        self.store = store
        self.settings = settings
        self.registry = CollectorRegistry()
        self.ingested = Counter(
            "binder_log_records_ingested", "Records stored", ["via"], registry=self.registry
        )
        self.refused = Counter(
            "binder_log_records_refused", "Records refused", registry=self.registry
        )
        self.query_latency = Histogram(
            "binder_log_query_seconds", "GET /logs latency", registry=self.registry
        )
        self.subscribers: set[tuple[LogFilters, asyncio.Queue[dict[str, Any]]]] = set()
        skip = tuple(s for s in settings.logging.tail_skip.split(",") if s)
        self.tailer = Tailer(
            logs_dir=settings.home / "logs",
            store=store,
            sink=self.publish,
            skip=skip,
            quota=AppQuota(
                lines_per_second=settings.logging.app_lines_per_second,
                bytes_per_second=settings.logging.app_bytes_per_second,
            ),
        )
        self.retention_interval = retention_interval
        self.healthy = "unknown"
        self._opened = False
        self._looked = -DB_LOOK_EVERY_SECONDS
        self._background = LoopSupervisor()

    async def publish(self, records: list[dict[str, Any]]) -> None:
        for filters, queue in list(self.subscribers):
            for record in records:
                if filters.matches(record) and queue.qsize() < STREAM_QUEUE:
                    queue.put_nowait(record)

    async def start(self) -> None:
        self._background.spawn(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.store.open()
                break
            except BinderError as exc:
                self.healthy = exc.message
                logger.warning("waiting for the database: {}", exc.message)
                await anyio.sleep(1.0)
        self.healthy = "ok"
        self._opened = True
        self._background.run("tailing", self.tailer.run)
        self._background.run("retention", self._retention)

    async def health(self) -> dict[str, str]:
        """The database's word and each supervised loop's state. The database is asked when
        health is asked (at most once a second, bounded by a deadline), not on a timer."""
        if self._opened and time.monotonic() - self._looked >= DB_LOOK_EVERY_SECONDS:
            self._looked = time.monotonic()
            try:
                with anyio.fail_after(DB_LOOK_DEADLINE_SECONDS):
                    await self.store.ping()
                self.healthy = "ok"
            except BinderError as exc:
                self.healthy = exc.message
            except TimeoutError:
                self.healthy = f"no answer within {DB_LOOK_DEADLINE_SECONDS:g} s"
        return {"database": self.healthy, **self._background.health()}

    async def _retention(self) -> None:
        await repeat(self.apply_retention, every=self.retention_interval, what="retention")

    async def apply_retention(self) -> int:
        """Remove the lines older than ``retention_days``, and the apps' output files nothing
        was written to for as long, once every line of them is stored; returns lines removed."""
        kept = timedelta(days=self.settings.logging.retention_days)
        cutoff = datetime.now(UTC) - kept
        removed = await self.store.delete_before(cutoff)
        if removed:
            logger.info("retention removed {} lines older than {}", removed, cutoff.isoformat())
        files = await self.tailer.remove_ended_apps(idle_seconds=kept.total_seconds())
        if files:
            logger.info("retention removed {} apps' output files, read to their end", files)
        return removed

    async def stop(self) -> None:
        await self._background.cancel_all()
        await self.store.close()


def _agg(request: Request) -> Aggregator:
    agg: Aggregator = request.state.aggregator
    return agg


def _authorized(request: Request) -> Aggregator:
    """The aggregator, once the request carries its bearer token (compared in constant time)."""
    agg = _agg(request)
    token = agg.settings.logging.token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not token:
        raise UnauthorizedError("the log aggregator has no token (BINDER_LOGGING_TOKEN) set")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise UnauthorizedError("missing or wrong token: send Authorization: Bearer <token>")
    return agg


async def ingest(request: Request) -> Response:
    agg = _authorized(request)
    body = await read_body(request, agg.settings.logging.max_body_bytes)
    records, refused = parse_body(body, max_depth=agg.settings.http.max_json_depth)
    stored = await agg.store.insert(records)
    agg.ingested.labels(via="http").inc(stored)
    await agg.publish(records)
    if refused:
        agg.refused.inc(len(refused))
        return JSONResponse(
            {
                "type": "malformedRequest",
                "error": f"{len(refused)} records refused, {len(records)} accepted",
                "accepted": len(records),
                "refused": refused[:100],
            },
            status_code=422,
        )
    return JSONResponse({"accepted": len(records)})


def _limit(params: Any) -> int:
    raw = params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise MalformedRequestError(f"limit: must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _order(params: Any) -> bool:
    order = params.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise MalformedRequestError("order: must be newest or oldest")
    return bool(order == "oldest")


async def query(request: Request) -> Response:
    agg = _authorized(request)
    params = request.query_params
    started = time.perf_counter()
    filters = parse_filters(dict(params), now=datetime.now(UTC))
    docs, cursor = await agg.store.query(
        filters, limit=_limit(params), cursor=params.get("cursor"), oldest_first=_order(params)
    )
    agg.query_latency.observe(time.perf_counter() - started)
    return JSONResponse({"records": [to_wire(d) for d in docs], "next": cursor})


async def stream(request: Request) -> Response:
    agg = _authorized(request)
    filters = parse_filters(dict(request.query_params), now=datetime.now(UTC))
    live = LogFilters(filters.service, filters.level, filters.app, None, filters.until, filters.q)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    entry = (live, queue)
    agg.subscribers.add(entry)

    async def events() -> AsyncIterator[str]:
        try:
            yield ": tailing\n\n"
            while True:
                try:
                    record = await asyncio.wait_for(queue.get(), timeout=15.0)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                yield f"event: log\ndata: {json.dumps(to_wire(record), default=str)}\n\n"
        finally:
            agg.subscribers.discard(entry)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def health(request: Request) -> Response:
    checks = await _agg(request).health()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
    )


async def metrics(request: Request) -> Response:
    return metrics_response(_agg(request).registry)


def create_app(
    settings: Settings,
    *,
    store: LogStore | None = None,
) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        agg = Aggregator(
            store=store or LogStore(uri=settings.db.effective_uri, database=settings.db.database),
            settings=settings,
            retention_interval=settings.logging.retention_check_seconds,
        )
        await agg.start()
        try:
            yield {"aggregator": agg}
        finally:
            await agg.stop()

    routes = [
        Route("/logs", ingest, methods=["POST"]),
        Route("/logs", query, methods=["GET"]),
        Route("/logs/stream", stream, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
