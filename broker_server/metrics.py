"""Prometheus metrics of the cache server: request rates, latencies, bytes, devices online, cache fill."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class _HistogramSeries:
    """One label set of a CountedHistogram."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, amount: float, count: int = 1) -> None:
        """`count` observations of `amount` (a batch's replies all waited the same time)."""
        bucket = bisect_left(self._bounds, amount)
        with self._lock:
            self._counts[bucket] += count
            self._sum += amount * count

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


class CountedHistogram(Collector):
    """A labelled histogram whose `labels(...).observe(amount, count)` takes many equal observations at once.

    Exposed like prometheus_client's Histogram (`_bucket` with `le`, `_count`, `_sum`), without the per
    observation lock and bucket walk that made one call per reply cost more than the rest of its metrics.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, tuple(labelnames)
        self._bounds = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], _HistogramSeries] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> _HistogramSeries:
        series = self._series.get(values)
        if series is None:
            with self._lock:
                series = self._series.setdefault(values, _HistogramSeries(self._bounds))
        return series

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in sorted(self._series.items()):
            counts, total = series.snapshot()
            cumulative, buckets = 0, []
            for bound, count in zip([*self._bounds, float("inf")], counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(cumulative)))
            family.add_metric(list(values), buckets, total)
        yield family


class ServerMetrics:
    """All series the server exports, on a private registry so tests can create many servers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fedcache_requests", "Requests handled", ["kind", "outcome"], registry=self.registry)
        self.latency = CountedHistogram(
            "fedcache_request_latency_seconds",
            "From arrival at the server to the reply being published (includes the durable commit)",
            ["kind"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.bytes_in = Counter("fedcache_bytes_in", "Request payload bytes", ["kind"], registry=self.registry)
        self.bytes_out = Counter("fedcache_bytes_out", "Reply payload bytes", ["kind"], registry=self.registry)
        self.batch_size = Histogram(
            "fedcache_commit_batch_messages",
            "Messages made durable by one commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.devices = Gauge("fedcache_devices_registered", "Devices that said hello", registry=self.registry)
        self.devices_online = Gauge(
            "fedcache_devices_active", "Devices with a request in the last minute", registry=self.registry
        )
        self.samples = Gauge("fedcache_samples_registered", "Registered samples", registry=self.registry)
        self.cache_fill = Gauge(
            "fedcache_cache_fill_ratio", "Fraction of registered samples with knowledge", registry=self.registry
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (Prometheus text format)."""
        start_http_server(port, addr=addr, registry=self.registry)
