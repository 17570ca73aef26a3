"""A loguru sink that ships records to the log aggregator without ever blocking the caller.

Records go into a bounded buffer; a daemon thread posts them in batches to ``POST /logs`` with the
aggregator's bearer token, retrying while the aggregator is down. The thread sleeps while nothing
is logged; a record wakes it, and what arrives within ``FLUSH_SECONDS`` goes in the same batch. Each record carries a unique
``rid`` so that a batch sent twice (an answer lost in a restart) is stored once. Nothing is lost
silently: a batch answered 413 (too large) is split in halves and sent again; a single record too
large to store, records the aggregator refuses (4xx, a wrong token too), and the oldest records
when the buffer is full are dropped and counted (``binder_log_records_dropped_total``, see
:meth:`AggregatorSink.collector`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from common.logs import record_id, record_to_dict
from common.owned_http import ForeignServerError, hooks

BATCH = 5000
FLUSH_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0


class AggregatorSink:
    def __init__(self, url: str, *, token: str, capacity: int = 50_000) -> None:
        self._url = url.rstrip("/") + "/logs"
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self._buffer: deque[dict[str, Any]] = deque()
        self._inflight: list[dict[str, Any]] = []
        self._capacity = capacity
        self._lock = threading.Lock()
        self._wake = threading.Event()
        """Set when a batch is full: send it without waiting out ``FLUSH_SECONDS``."""
        self._arrived = threading.Event()
        """Set when a record came: there is something to send."""
        self._closed = threading.Event()
        self.dropped = 0
        self.sent = 0
        self._last_answer: Any = None
        self._refused_server = False
        """The last attempt found the aggregator's port held by another user."""
        self._thread = threading.Thread(target=self._run, name="log-sink", daemon=True)
        self._thread.start()

    def __call__(self, message: Any) -> None:
        self.push(record_to_dict(message.record))

    def push(self, record: dict[str, Any]) -> None:
        record.setdefault("rid", record_id())
        with self._lock:
            if len(self._buffer) >= self._capacity:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(record)
            self._arrived.set()
            if len(self._buffer) >= BATCH:
                self._wake.set()

    def collector(self) -> Collector:
        """``binder_log_records_dropped_total``: records lost because the buffer was full."""
        sink = self

        class Dropped(Collector):
            def collect(self) -> Iterator[CounterMetricFamily]:
                yield CounterMetricFamily(
                    "binder_log_records_dropped",
                    "Log records dropped: the sink's buffer was full, or the aggregator refused them",
                    value=sink.dropped,
                )

        return Dropped()

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer) + len(self._inflight)

    def _take(self) -> list[dict[str, Any]]:
        """The batch in flight: taken out of the buffer once, resent as it is until it is
        accepted (so the aggregator can tell a resent batch from a new one)."""
        with self._lock:
            if not self._inflight:
                count = min(BATCH, len(self._buffer))
                self._inflight = [self._buffer.popleft() for _ in range(count)]
            return self._inflight

    def _sent(self, *, refused: int = 0) -> None:
        with self._lock:
            self.sent += len(self._inflight) - refused
            self.dropped += refused
            self._inflight = []

    def _split(self) -> None:
        """Send the first half of the batch in flight on its own; the rest goes back in front."""
        with self._lock:
            half = len(self._inflight) // 2
            self._buffer.extendleft(reversed(self._inflight[half:]))
            self._inflight = self._inflight[:half]

    def _run(self) -> None:
        delay = 0.1
        with httpx.Client(timeout=10.0, event_hooks=hooks("the logging token")) as client:
            while True:
                self._arrived.wait()
                self._wake.wait(FLUSH_SECONDS)
                self._arrived.clear()
                self._wake.clear()
                while batch := self._take():
                    code = self._post(client, batch)
                    if code == 413 and len(batch) > 1:
                        self._split()
                    elif code is not None and code < 500:
                        self._sent(refused=self._refused(code, batch))
                        delay = 0.1
                    else:
                        if self._closed.is_set():
                            return
                        time.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX_SECONDS)
                if self._closed.is_set():
                    return

    def _post(self, client: httpx.Client, batch: list[dict[str, Any]]) -> int | None:
        """The aggregator's answer to ``batch``, or None when it could not be reached."""
        try:
            response = client.post(
                self._url,
                content=json.dumps(batch, default=str),
                headers=self._headers,
            )
        except ForeignServerError as exc:  # kept and sent again once the aggregator is back
            if not self._refused_server:  # said once, on stderr (loguru would come back here)
                sys.stderr.write(f"log sink: {exc}\n")
            self._refused_server = True
            return None
        except httpx.HTTPError:
            return None
        self._refused_server = False
        self._last_answer = response
        return response.status_code

    def _refused(self, code: int, batch: list[dict[str, Any]]) -> int:
        """How many records of an answered ``batch`` were refused for good (4xx: retrying
        would not help): those the answer counts, else the whole batch."""
        if code < 400:
            return 0
        if code in (401, 403):
            # a wrong token: the records are lost, so say so (on stderr: logging it through
            # loguru would come back here)
            sys.stderr.write(f"log sink: the aggregator refused the token; {len(batch)} dropped\n")
            return len(batch)
        try:
            accepted = int(self._last_answer.json().get("accepted", 0))
        except (ValueError, AttributeError, TypeError):
            accepted = 0
        return max(0, len(batch) - accepted)

    def close(self, timeout: float = 2.0) -> None:
        """Flush what can be flushed within ``timeout`` seconds, then stop the thread."""
        deadline = time.monotonic() + timeout
        self._arrived.set()
        self._wake.set()
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._closed.set()
        self._arrived.set()
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
