"""Prometheus metrics of the cache server: request rates, latencies, bytes, devices online, cache fill."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ServerMetrics:
    """All series the server exports, on a private registry so tests can create many servers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fedcache_requests", "Requests handled", ["kind", "outcome"], registry=self.registry)
        self.latency = Histogram(
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
