"""Prometheus metrics of the deploy server, on a registry of its own (no module globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, *collectors: Collector) -> None:
        self.registry = CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)
        self.launches = Counter(
            "binder_launches",
            "Launches accepted (answered with a deployment id), by template; launches refused "
            "(unknown template, capacity, per-client limits, a dependency down) are not counted",
            ["template"],
            registry=self.registry,
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

    def text(self) -> bytes:
        """Every metric in Prometheus' text format, as /metrics shows them."""
        return generate_latest(self.registry)

    def latency(self) -> dict[str, Any]:
        """The launch-latency histogram: cumulative counts per bucket, its count and sum, by
        ``pooled`` (``true``/``false``)."""
        out: dict[str, Any] = {}
        for family in self.launch_latency.collect():
            for sample in family.samples:
                series = out.setdefault(
                    sample.labels.get("pooled", ""), {"buckets": [], "count": 0, "sum": 0.0}
                )
                if sample.name.endswith("_bucket"):
                    series["buckets"].append([sample.labels["le"], int(sample.value)])
                elif sample.name.endswith("_count"):
                    series["count"] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    series["sum"] = sample.value
        return out


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


class LeasesHeld(Collector):
    """``binder_lease_held{lease}``: 1 while this server holds the lease (``leader``,
    ``routes``), else 0."""

    def __init__(self, read: Callable[[], dict[str, bool]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "binder_lease_held", "Whether this server holds the lease", labels=["lease"]
        )
        for lease, held in sorted(self._read().items()):
            family.add_metric([lease], 1 if held else 0)
        yield family
