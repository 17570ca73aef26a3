"""Prometheus metrics of the deploy server, on a registry of its own (no module globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, *collectors: Collector) -> None:
        self.registry = CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)
        self.launches = Counter(
            "binder_launches", "Launch requests accepted", ["template"], registry=self.registry
        )
        self.launch_latency = Histogram(
            "binder_launch_latency_seconds",
            "Time from launch request to deployed",
            ["pooled"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.transitions = Counter(
            "binder_transitions", "Deployment status changes", ["status"], registry=self.registry
        )
        self.deployments = Gauge(
            "binder_deployments",
            "Deployments by status (pooled ones apart)",
            ["status"],
            registry=self.registry,
        )
        self.pooled = Gauge(
            "binder_pool_ready",
            "Pooled instances ready, by template",
            ["template"],
            registry=self.registry,
        )
        self.culls = Counter("binder_culls", "Deployments culled", ["why"], registry=self.registry)
        self.loop_crashes = Counter(
            "binder_loop_crashes",
            "Crashes of supervised background loops (each restarted with backoff)",
            ["loop"],
            registry=self.registry,
        )
        self.errors = Counter("binder_errors", "Errors by type", ["type"], registry=self.registry)


class BackendCalls(Collector):
    """``binder_backend_api_calls_total{verb}``, read from the backend's own count."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "binder_backend_api_calls", "Calls to the backend's API", labels=["verb"]
        )
        for verb, count in sorted(self._read().items()):
            family.add_metric([verb], count)
        yield family
