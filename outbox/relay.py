"""The outbox relay: unpublished outbox rows -> Kafka (acks=all) -> rows marked published.

Ownership. The slots are the audit topic's Kafka partitions: a session's rows go to partition
session_hash % partitions (Kafka's own key partitioning). A relay publishes a partition's rows
only while it holds that partition's lease (mesh_relay_leases), renewed at the start of every
round; a relay that stops renewing (frozen, hung, cut off from the broker) loses it after
`relay_lease_s`, whether or not its connection is alive, and a crashed relay's leases are free
at once (its liveness lock went with its connection). Live relays share the partitions evenly
(each takes ceil(partitions / relays)). So a session's rows, and a partition's records, are
written by one relay at a time. (One writer per partition is also what Tansu needs: concurrent
producers to one partition there get overlapping offsets.)

Fencing. Each change of owner raises the partition's lease epoch. The mark checks the epoch in
the same statement, so a relay that lost a partition cannot mark rows there; and it starts no
send there once its lease ran out by its own clock. A batch it had handed to the broker before
it froze may still land late: a duplicate with the same event ids (the new owner sends those
rows too), which readers de-duplicate; replay orders by `mesh-seq`, so order holds.

No skipped rows. The relay never reads "id > last id". Each round selects rows still marked
unpublished, in id order, so a transaction that commits late, holding low ids, is simply found
by the next round. (ARCHITECTURE.md explains why this also keeps causal order per session.)

Order. A session maps to one Kafka partition (key = session id). Each round sends one explicit
record batch per partition at a time and waits for its ack before the next; the first failed
batch stops that partition for the round, and only the acked prefix is marked. So nothing
after a failure reaches Kafka before it, and a re-send repeats rows in their original order.

At-least-once. A crash after the ack and before the mark re-sends those rows: duplicates carry
the same event id, and readers (replay) keep each event once. Every record also carries its
row's id (header `mesh-seq`), the session's commit order, which replay sorts by.

Lost records heal by themselves. A broker that hands out an offset it had already acked has
lost the records from there on; the relay then marks the rows it had acked there unpublished
again, in the transaction of its next mark, so they are sent again (relay_heal).

Where it lives. This module is the relay's entry point and re-exports its public names; the
code is split by idea: relay_state (shared state, Row), relay_slots (partition leases),
relay_kafka (producer, probe, in-order send), relay_rounds (one round: fetch, send, mark),
relay_heal (re-sending what the broker lost after acking it), relay_housekeeping (backlog,
pruning), relay_loop (`Relay`: lifecycle and the round loop),
relay_serve (`serve`, the `mesh relay run` process), relay_metrics.
"""

from __future__ import annotations

from agentmesh.outbox.relay_housekeeping import PRUNE_LOCK_CLASS
from agentmesh.outbox.relay_kafka import KafkaUnavailable
from agentmesh.outbox.relay_loop import Relay
from agentmesh.outbox.relay_metrics import RelayMetrics
from agentmesh.outbox.relay_rounds import INDEX_GAP, RoundResult
from agentmesh.outbox.relay_serve import serve
from agentmesh.outbox.relay_slots import LIVE_LOCK_CLASS, SlotConfigMismatch
from agentmesh.outbox.relay_state import LEASE_HEADER, Row

__all__ = [
    "INDEX_GAP",
    "LEASE_HEADER",
    "LIVE_LOCK_CLASS",
    "PRUNE_LOCK_CLASS",
    "KafkaUnavailable",
    "Relay",
    "RelayMetrics",
    "RoundResult",
    "Row",
    "SlotConfigMismatch",
    "serve",
]
