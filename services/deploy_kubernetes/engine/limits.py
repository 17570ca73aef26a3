"""Per-client limits on launches: deployments one client holds at once, launches per minute.

A client is a :class:`Caller`'s address, worked out once per request at the HTTP edge
(:mod:`services.deploy_kubernetes.api.caller`). Callers with the API key are not limited.

Both limits are kept in the database, shared by every server: the launches of the last minute in
a moving window per client (the store's :class:`~..store.base.Windows`, the ``limits`` library's),
hit before the launch; the deployments a client holds in a count that the store moves in the
same transaction as the record it is about (``client_limit`` of an admission or a pooled claim),
so the count is exact across servers and after any crash.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.errors import MISSING_KEY
from services.deploy_kubernetes.errors import RateLimitedError, UnauthorizedError
from services.deploy_kubernetes.store.base import Windows

KEY_CLIENT = "api-key"
"""The ``client`` of a deployment launched with the API key (it counts towards no limit)."""


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Who sent a request: the client's ``address`` (the peer, or the right-most untrusted
    ``X-Forwarded-For`` hop) and whether it presented the API key (``keyed``)."""

    address: str
    keyed: bool = False

    @property
    def client(self) -> str:
        """What a deployment it launches records as its ``client``."""
        return KEY_CLIENT if self.keyed else self.address

    @property
    def who(self) -> str:
        """The caller for the audit trail: ``api-key from <address>``, or the address."""
        return f"{KEY_CLIENT} from {self.address}" if self.keyed else self.address

    def require_key(self) -> None:
        """Refuse (403) a caller without the API key."""
        if not self.keyed:
            raise UnauthorizedError(MISSING_KEY)


class MovingWindow:
    """In one process (the console's sign-in throttle; the launch windows are the store's).

    At most ``amount`` events of each key in any ``seconds``: the times of each key's last
    ``amount`` events, oldest first; keys with no event in the window are forgotten."""

    def __init__(
        self, *, amount: int, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.amount = amount
        self.seconds = seconds
        self._clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        """Per key, least recently hit first."""

    def hit(self, key: str) -> float:
        """Count an event of ``key`` and return 0; or, when its window is full, count nothing and
        return the seconds until it has room."""
        now = self._clock()
        while self._events:  # forget keys whose last event has left the window
            oldest = next(iter(self._events.values()))
            if oldest[-1] > now - self.seconds:
                break
            self._events.popitem(last=False)
        events = self._events.setdefault(key, deque(maxlen=self.amount))
        self._events.move_to_end(key)
        if len(events) == self.amount and events[0] > now - self.seconds:
            return events[0] + self.seconds - now
        events.append(now)
        return 0.0

    def full_for(self, key: str) -> float:
        """Seconds until ``key``'s window has room (0 when it has), counting nothing."""
        events = self._events.get(key)
        if events is None or len(events) < self.amount:
            return 0.0
        return max(0.0, events[0] + self.seconds - self._clock())

    def keys(self) -> int:
        """How many keys are remembered (those with an event in the window)."""
        return len(self._events)


class ClientLimits:
    def __init__(self, *, max_deployments: int, launches_per_minute: int, windows: Windows) -> None:
        self.max_deployments = max_deployments
        self.launches_per_minute = launches_per_minute
        self._windows = windows
        self._held: dict[str, int] = {}
        self.refused: Counter[str] = Counter()

    def limit_for(self, caller: Caller) -> int | None:
        """The most deployments ``caller`` may hold; None for a caller with the key."""
        return None if caller.keyed else self.max_deployments

    async def hit(self, caller: Caller) -> None:
        """Count a launch of ``caller`` in its window, or raise :class:`RateLimitedError`
        (429) when the window is full; a caller with the key is not counted."""
        if caller.keyed:
            return
        full_for = await self._windows.hit(caller.address)
        if full_for:
            self.refused["per_client_launches_per_minute"] += 1
            wait = max(1, math.ceil(full_for))
            raise RateLimitedError(
                f"per_client_launches_per_minute: this client started its maximum of "
                f"{self.launches_per_minute} launches in a minute; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    def refused_held(self) -> None:
        """A launch was refused at the client's deployment count."""
        self.refused["per_client_max_deployments"] += 1

    def note_held(self, clients: dict[str, int]) -> None:
        """The deployments each client holds, as last counted (shown by the console and
        /metrics)."""
        self._held = {c: n for c, n in clients.items() if c != KEY_CLIENT and n > 0}

    def collector(self) -> Collector:
        return _LimitsCollector(self)

    def held(self) -> dict[str, int]:
        return dict(self._held)


class _LimitsCollector(Collector):
    """Per-client limits in /metrics, without naming any client (addresses stay private)."""

    def __init__(self, limits: ClientLimits) -> None:
        self._limits = limits

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        held = self._limits.held()
        yield GaugeMetricFamily(
            "binder_clients_with_deployments",
            "Client addresses holding at least one deployment",
            value=len(held),
        )
        yield GaugeMetricFamily(
            "binder_client_deployments_max",
            "Most deployments held by one client address",
            value=max(held.values(), default=0),
        )
        refused = CounterMetricFamily(
            "binder_rate_limited", "Launches refused by a per-client limit", labels=["limit"]
        )
        for name in ("per_client_max_deployments", "per_client_launches_per_minute"):
            refused.add_metric([name], self._limits.refused[name])
        yield refused
