"""Prometheus metrics of one agent process (served on /metrics).

Two kinds of series. Counters and histograms are this replica's own: `sum()` them over
replicas. The group gauges (`mesh_group_lag`, `mesh_group_pending`, `mesh_dlq_depth`) are
one value of the whole consumer group (or DLQ stream) that every replica samples from
Redis, so N replicas export N copies of one number: aggregate them with
`max by (agent, stream) (...)`, never `sum()` (docs/deploy.md, "Metrics").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentmesh.process.build_info import register_process_metrics

if TYPE_CHECKING:
    from agentmesh.agents.resilience import Dependency

#: Group-scope gauges: one value per group, repeated by every replica; aggregate with max().
GROUP_GAUGES = ("mesh_group_pending", "mesh_group_lag", "mesh_dlq_depth")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.processed = Counter(
            "mesh_messages_processed",
            "Inputs whose unit of work committed",
            ["agent", "type"],
            registry=r,
        )
        self.duplicates = Counter(
            "mesh_messages_duplicate",
            "Redeliveries detected by idempotency key",
            ["agent"],
            registry=r,
        )
        self.retried = Counter(
            "mesh_messages_retried",
            "Deliveries scheduled again after a failure",
            ["agent", "type"],
            registry=r,
        )
        self.failed = Counter(
            "mesh_messages_failed", "Handler or commit failures", ["agent", "type"], registry=r
        )
        self.dead_lettered = Counter(
            "mesh_messages_dead_lettered",
            "Entries copied to the DLQ",
            ["agent", "reason"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "mesh_handler_seconds",
            "Handler latency",
            ["agent", "type"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300),
        )
        self.session_seconds = Histogram(
            "mesh_session_seconds",
            "End-to-end time of a session, from its first event to the handler that ended it",
            ["agent", "outcome"],
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
        )
        self.batch_size = Histogram(
            "mesh_batch_size",
            "Entries per processed batch",
            ["agent"],
            registry=r,
            buckets=(1, 2, 5, 10, 25, 50, 100, 200, 500, 1000),
        )
        self.breaker_state = Gauge(
            "mesh_breaker_state",
            "0 closed, 1 half-open, 2 open",
            ["agent", "dependency"],
            registry=r,
        )
        self.breaker_opened = Counter(
            "mesh_breaker_opened",
            "Times the breaker has opened (a failed half-open probe counts again)",
            ["agent", "dependency"],
            registry=r,
        )
        self.pending = Gauge(
            "mesh_group_pending",
            "Delivered, not yet acked entries of the group (group-wide, the same in every "
            "replica: aggregate with max by (agent, stream))",
            ["agent", "stream"],
            registry=r,
        )
        self.lag = Gauge(
            "mesh_group_lag",
            "Entries not yet delivered to the group (group-wide, the same in every replica: "
            "aggregate with max by (agent, stream))",
            ["agent", "stream"],
            registry=r,
        )
        self.dlq_depth = Gauge(
            "mesh_dlq_depth",
            "Entries in the DLQ stream (mesh-wide, the same in every replica: aggregate with "
            "max by (stream))",
            ["stream"],
            registry=r,
        )
        register_process_metrics(r, "agent")

    def watch_budgets(self, agent: str, dependencies: Mapping[str, Dependency]) -> None:
        """Export the shared budgets this replica uses, read at each scrape."""
        if any(d.spec.budget is not None for d in dependencies.values()):
            self.registry.register(_Budgets(agent, dependencies))


class _Budgets(Collector):
    """mesh_budget_tokens (the shared bucket's balance as this replica last saw it),
    mesh_budget_exhausted_total (calls parked here because the budget had no room within their
    max wait) and mesh_budget_waited_total (calls that waited their turn)."""

    def __init__(self, agent: str, dependencies: Mapping[str, Dependency]) -> None:
        self.agent = agent
        self.dependencies = dependencies

    def collect(self) -> Iterator[Metric]:
        labels = ["agent", "dependency"]
        tokens = GaugeMetricFamily(
            "mesh_budget_tokens", "Units in the shared budget, as last seen here", labels=labels
        )
        exhausted = CounterMetricFamily(
            "mesh_budget_exhausted",
            "Calls parked because the shared budget had no room within their max wait",
            labels=labels,
        )
        waited = CounterMetricFamily(
            "mesh_budget_waited", "Calls that waited their turn in the shared budget", labels=labels
        )
        for name, dep in sorted(self.dependencies.items()):
            if dep.spec.budget is None:
                continue
            if dep.budget_tokens is not None:
                tokens.add_metric([self.agent, name], dep.budget_tokens)
            exhausted.add_metric([self.agent, name], dep.budget_refused)
            waited.add_metric([self.agent, name], dep.budget_waited)
        yield from (tokens, exhausted, waited)
