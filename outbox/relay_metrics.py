"""The relay's Prometheus metrics, in one registry per relay.

Apart from the relay's logic so that every series (dashboards, alerts and tests read them by
name) is declared in one place, and each relay piece counts into the registry /metrics serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentmesh.process.build_info import register_process_metrics


@dataclass(frozen=True)
class LeaseSample:
    """One partition's lease at scrape time."""

    partition: int
    owner: str  # "" when free
    epoch: int
    age_s: float | None  # since its last renewal
    progress_s: float | None  # since its owner last published or caught up there


class _Leases(Collector):
    """Per-partition lease gauges, computed when /metrics is scraped (ages stay current)."""

    def __init__(self, sample: Callable[[], list[LeaseSample]]) -> None:
        self.sample = sample

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["partition", "owner"]
        epoch = GaugeMetricFamily(
            "mesh_relay_lease_epoch",
            "Each audit partition's lease epoch and owner (as this relay last read them; its "
            "own partitions are current)",
            labels=labels,
        )
        age = GaugeMetricFamily(
            "mesh_relay_lease_age_seconds",
            "Seconds since each partition's lease was last renewed",
            labels=labels,
        )
        progress = GaugeMetricFamily(
            "mesh_relay_lease_last_progress_seconds",
            "Seconds since each partition's owner last published rows there or found it caught up",
            labels=labels,
        )
        for s in self.sample():
            values = [str(s.partition), s.owner]
            epoch.add_metric(values, s.epoch)
            if s.age_s is not None:
                age.add_metric(values, s.age_s)
            if s.progress_s is not None:
                progress.add_metric(values, s.progress_s)
        yield epoch
        yield age
        yield progress


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.published = Counter(
            "mesh_relay_published", "Outbox rows acked by Kafka and marked", registry=r
        )
        self.send_failures = Counter(
            "mesh_relay_send_failures", "Record batches Kafka did not ack", registry=r
        )
        self.backlog_rows = Gauge(
            "mesh_outbox_backlog_rows", "Outbox rows not yet published to Kafka", registry=r
        )
        self.backlog_age = Gauge(
            "mesh_outbox_backlog_oldest_seconds",
            "Age of the oldest unpublished outbox row",
            registry=r,
        )
        self.slots_owned = Gauge(
            "mesh_relay_slots_owned", "Partitions (slots) this relay owns", registry=r
        )
        self.relays = Gauge("mesh_relay_members", "Live relays seen by this one", registry=r)
        self.offset_regressions = Counter(
            "mesh_relay_offset_regressions",
            "Acks whose offset was not above one acked before (the broker lost records)",
            registry=r,
        )
        self.healed_rows = Counter(
            "mesh_relay_healed_rows",
            "Outbox rows sent again by the relay itself because the broker lost them after "
            "acking them (see mesh_relay_offset_regressions)",
            registry=r,
        )
        self.pruned = Counter("mesh_outbox_pruned", "Published rows pruned", registry=r)
        self.takeovers = Counter(
            "mesh_relay_lease_takeovers",
            "Partitions this relay took from another relay whose lease expired or who was gone",
            registry=r,
        )
        self.leases_lost = Counter(
            "mesh_relay_leases_lost",
            "Partitions this relay found taken by another relay (it had stopped renewing)",
            registry=r,
        )
        self.fenced_sends = Counter(
            "mesh_relay_fenced_sends",
            "Record batches not sent because this relay's lease on the partition ran out",
            registry=r,
        )
        self.read_ahead = Counter(
            "mesh_relay_rounds_read_ahead",
            "Rounds whose rows were read while the previous round's sends waited for acks",
            registry=r,
        )
        self.fenced_rows = Counter(
            "mesh_relay_fenced_rows",
            "Acked rows whose mark was refused: another relay holds the partition's lease now",
            registry=r,
        )
        self.round_seconds = Histogram(
            "mesh_relay_round_seconds",
            "One relay round: read, send, wait for acks, mark",
            registry=r,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )
        register_process_metrics(r, "relay")

    def watch_leases(self, sample: Callable[[], list[LeaseSample]]) -> None:
        """Serve each partition's owner, lease age and last progress from `sample()`."""
        self.registry.register(_Leases(sample))
