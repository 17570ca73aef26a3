"""Per-client limits on launches: deployments one client holds at once, launches per minute.

A client is the address the request came from, or, when that address is a trusted proxy, the
right-most address of ``X-Forwarded-For`` that is not a trusted proxy (the left part of the header
is whatever the client chose to send). Requests with the API key are not limited.

The launch rate is a moving window kept here (:class:`MovingWindow`) rather than the ``limits``
library's: its in-memory storage starts a timer thread on a hit when its last one has ended, and
on a busy machine that start took 0.25 ms at the median and up to 5 ms, on every launch that came
more than 10 ms after the one before (measured). The count of deployments
is exact under concurrency: :meth:`ClientLimits.reserve` checks and takes a slot in one step
(no await in between), the slot is bound to the deployment's id once it exists, and it is given
back when that deployment reaches a final status. At start the counts are seeded from the store's
active records, which keep each deployment's ``client``.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request

from services.deploy_kubernetes.errors import RateLimitedError
from services.deploy_kubernetes.models import Deployment

KEY_CLIENT = "api-key"
"""The ``client`` of a deployment launched with the API key (it counts towards no limit)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


class MovingWindow:
    """At most ``amount`` events of each key in any ``seconds``: the times of each key's last
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

    def keys(self) -> int:
        """How many keys are remembered (those with an event in the window)."""
        return len(self._events)


@dataclass
class Reservation:
    """One slot of a client's deployments, taken before the launch; bound or cancelled after."""

    owner: ClientLimits
    client: str
    settled: bool = field(default=False)

    def bind(self, dep_id: str) -> None:
        """The launch made deployment ``dep_id``: the slot is its until it ends."""
        if not self.settled:
            self.settled = True
            self.owner.bind(dep_id, self.client)

    def cancel(self) -> None:
        """The launch failed before a deployment existed: give the slot back."""
        if not self.settled:
            self.settled = True
            self.owner.release(self.client)


class ClientLimits:
    def __init__(
        self,
        *,
        max_deployments: int,
        launches_per_minute: int,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.max_deployments = max_deployments
        self._launches = MovingWindow(amount=launches_per_minute, seconds=60.0)
        self._trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(p, strict=False) for p in trusted_proxies
        )
        self._held: Counter[str] = Counter()
        self._owner: dict[str, str] = {}
        self.refused: Counter[str] = Counter()

    # --- who is asking --------------------------------------------------------------------------

    def _trusted_address(self, text: str) -> bool:
        address = _address(text)
        return address is not None and any(address in net for net in self._trusted)

    def client_of(self, request: Request) -> str:
        """The client's address: the peer, or the right-most untrusted ``X-Forwarded-For`` hop."""
        peer = request.client.host if request.client else "unknown"
        if not self._trusted or not self._trusted_address(peer):
            return peer
        hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
        for hop in reversed([h for h in hops if h]):
            if not self._trusted_address(hop):
                return hop if _address(hop) is not None else peer
        return peer

    # --- the limits -----------------------------------------------------------------------------

    def reserve(self, client: str) -> Reservation:
        """Take a slot and a launch for ``client``, or raise :class:`RateLimitedError` (429)."""
        if self._held[client] >= self.max_deployments:
            self.refused["per_client_max_deployments"] += 1
            raise RateLimitedError(
                f"per_client_max_deployments: this client runs its maximum of "
                f"{self.max_deployments} deployments; delete one or retry later",
                headers={"Retry-After": "60"},
            )
        full_for = self._launches.hit(client)
        if full_for:
            self.refused["per_client_launches_per_minute"] += 1
            wait = max(1, math.ceil(full_for))
            raise RateLimitedError(
                f"per_client_launches_per_minute: this client started its maximum of "
                f"{self._launches.amount} launches in a minute; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self._held[client] += 1
        return Reservation(self, client)

    def bind(self, dep_id: str, client: str) -> None:
        if dep_id in self._owner:  # a slot per deployment, however often it is bound
            self.release(client)
            return
        self._owner[dep_id] = client

    def release(self, client: str) -> None:
        self._held[client] -= 1
        if self._held[client] <= 0:
            del self._held[client]

    def note_end(self, dep_id: str) -> None:
        """Deployment ``dep_id`` reached a final status: its client's slot is free again."""
        client = self._owner.pop(dep_id, None)
        if client is not None:
            self.release(client)

    def seed(self, active: Iterable[Deployment]) -> None:
        """Count the active deployments of each client (at start, from the store)."""
        for dep in active:
            if dep.client and dep.client != KEY_CLIENT and dep.id not in self._owner:
                self._owner[dep.id] = dep.client
                self._held[dep.client] += 1

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
