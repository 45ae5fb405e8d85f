"""The relay's Prometheus metrics, in one registry per relay.

Apart from the relay's logic so that every series (dashboards, alerts and tests read them by
name) is declared in one place, and each relay piece counts into the registry /metrics serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agentmesh.process.build_info import register_process_metrics


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
        self.round_seconds = Histogram(
            "mesh_relay_round_seconds",
            "One relay round: read, send, wait for acks, mark",
            registry=r,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )
        register_process_metrics(r, "relay")
