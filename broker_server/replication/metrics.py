"""Prometheus series of a node's replication, read at each scrape: outbox backlog, log reachability, entry outcomes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker_server.replication.replicated_state import ReplicatedState


class ReplicationCollector(Collector):
    """What an operator watches on each node: an outbox that only grows, or a log that stays down, needs a look."""

    def __init__(self, state: ReplicatedState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        stats = self.state.replication()
        yield GaugeMetricFamily(
            "fedcache_replication_outbox_entries",
            "Log entries accepted here and not yet in the log",
            value=stats.backlog,
        )
        yield GaugeMetricFamily(
            "fedcache_replication_log_down", "1 while the last read of the replication log failed", value=stats.log_down
        )
        entries = CounterMetricFamily(
            "fedcache_replication_entries", "Log entries read by outcome (own updates not counted)", labels=["outcome"]
        )
        for outcome in ("applied", "rejected", "invalid"):
            entries.add_metric([outcome], getattr(stats, outcome))
        yield entries
        yield CounterMetricFamily(
            "fedcache_replication_errors",
            "Failures of the replication threads themselves (see the log); growing: this node stopped learning",
            value=stats.errors,
        )
        yield CounterMetricFamily(
            "fedcache_replication_trimmed_entries",
            "Log entries this node's trims removed (every claimed node had applied them durably)",
            value=stats.trimmed_entries,
        )
        yield GaugeMetricFamily(
            "fedcache_replication_forgotten",
            "1 when an operator forgot this node in the log while it ran: it may miss entries; seed it again",
            value=stats.forgotten,
        )
        yield CounterMetricFamily(
            "fedcache_replication_unresolved_samples",
            "Update rows from the log naming a sample this node does not hold (skipped)",
            value=stats.unresolved,
        )
