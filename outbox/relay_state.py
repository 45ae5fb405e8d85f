"""What every piece of the relay shares: one relay's state, and the outbox row it carries.

`Relay` (outbox/relay_loop.py) is assembled from pieces, one idea each: partition ownership
(relay_slots), the Kafka link (relay_kafka), one round (relay_rounds), table upkeep
(relay_housekeeping). They all work on the state set up here. The few methods one piece calls
in another are declared abstract here, so each piece type-checks on its own and none imports
the one it calls (no import cycles); `Relay` inherits the real ones.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agentmesh.outbox import kafka
from agentmesh.outbox.relay_metrics import LeaseSample, RelayMetrics
from agentmesh.settings import Settings


@dataclass(frozen=True)
class Row:
    id: int
    event_id: str
    session_id: str
    type: str
    envelope: str
    agent: str
    causation_id: str | None
    schema_version: int
    session_hash: int

    def headers(self, epoch: int) -> list[tuple[str, bytes]]:
        values = (
            self.event_id,
            self.type,
            str(self.schema_version),
            self.session_id,
            self.agent,
            self.causation_id or "",
        )
        out = [(k, v.encode()) for k, v in zip(kafka.HEADERS, values, strict=True)]
        out.append((kafka.SEQ_HEADER, str(self.id).encode()))  # the session's commit order
        out.append((LEASE_HEADER, str(epoch).encode()))  # the lease term that sent it
        return out


#: Record header: the epoch of the partition lease under which the record was sent. Within a
#: partition, a record whose epoch is below one written before it came from a relay that had
#: lost the partition (a batch it had handed to the broker before it froze).
LEASE_HEADER = "mesh-lease"


def lease_clock() -> float:
    """Seconds on a clock that keeps running while the process is stopped or the machine
    sleeps (CLOCK_BOOTTIME on Linux): a relay frozen past its lease must see it expired."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


@dataclass(frozen=True)
class LeaseView:
    """One partition's lease as this relay last saw it (for /metrics)."""

    partition: int
    owner: str | None
    epoch: int
    renewed_ago: float | None  # seconds since the lease was renewed, when it was read
    progress_ago: float | None  # seconds since its owner last published or caught up there
    read_at: float  # lease_clock() of the read


@dataclass
class Lost:
    """A partition whose broker handed out an offset it had already acked to this relay: the
    records from `offset` on are gone. Kept until the heal (relay_heal) has committed."""

    offset: int  # the lowest offset handed out again
    previous: int  # the highest offset acked before
    dropped: int = 0  # rows acked in the same round at or after `offset`, not marked


class RelayState(ABC):
    """One relay's state: settings, connections, owned slots, Kafka clients, the pending mark."""

    def __init__(
        self,
        settings: Settings,
        *,
        drain: bool = False,
        member: bool = True,
        name: str | None = None,
    ) -> None:
        self.s = settings
        self.drain = drain
        self.member = member
        self.name = name or f"relay-{socket.gethostname()}-{os.getpid()}"
        self.metrics = RelayMetrics()
        self.owned: set[int] = set()
        self.relays = 1
        self.kafka_ok = False
        self.kafka_failing = False  # the last round failed on Kafka: it made no progress
        self.pool: asyncpg.Pool | None = None
        # leases (relay_slots): this relay's liveness lock key, the epoch of each partition it
        # holds, until when (lease_clock) it may send there, when it renewed and progressed
        self.token = random.randint(1, 2**31 - 1)
        self.epochs: dict[int, int] = {}
        self._until: dict[int, float] = {}
        self._renewed: dict[int, float] = {}
        self._progress: dict[int, float] = {}
        self.leases: list[LeaseView] = []  # every partition's lease, as last read
        self._lease_conn: asyncpg.Connection | None = None
        self._producer: AIOKafkaProducer | None = None
        self._probe: AIOKafkaConsumer | None = None
        self.touching: bool | None = None  # the partition probe, decided per producer
        self._partitions: list[int] = []
        self._high: dict[int, int] = {}  # partition -> highest offset acked to this relay
        self._high_known: set[int] = set()  # partitions whose `_high` was looked up (relay_heal)
        self._high_owned: set[int] = set()  # the slots owned when `_high_known` was last checked
        self._lost: dict[int, Lost] = {}  # partition -> records lost, not yet healed
        self._ends_checked = 0.0  # monotonic time of the last idle end-offset check
        self._idle_healed: dict[int, float] = {}  # partition -> when an idle check found a loss
        self._wake = asyncio.Event()
        self._marking: asyncio.Task[None] | None = None  # the previous round's mark
        self._marking_ids: list[int] = []
        self._prefetch: asyncio.Task[list[Row]] | None = None  # the next round's rows
        self.slots = 0  # the topic's partition count, once Kafka told it
        self.metrics.watch_leases(self.lease_samples)

    def lease_samples(self) -> list[LeaseSample]:
        """Every partition's lease now: this relay's own as it holds them, the others' as last
        read from mesh_relay_leases, aged by the time since."""
        now = lease_clock()
        out: dict[int, LeaseSample] = {}
        for v in self.leases:
            gone = now - v.read_at
            out[v.partition] = LeaseSample(
                v.partition, v.owner or "", v.epoch,
                None if v.renewed_ago is None else v.renewed_ago + gone,
                None if v.progress_ago is None else v.progress_ago + gone,
            )  # fmt: skip
        for p in self.owned:
            renewed, progress = self._renewed.get(p), self._progress.get(p)
            out[p] = LeaseSample(
                p, self.name, self.epochs.get(p, 0),
                None if renewed is None else now - renewed,
                None if progress is None else now - progress,
            )  # fmt: skip
        return [out[p] for p in sorted(out)]

    def _note_lost(self, partition: int, offset: int, previous: int, *, dropped: int) -> None:
        """The broker handed out `offset` of `partition` again, after acking up to `previous`."""
        lost = self._lost.get(partition)
        if lost is None:
            self._lost[partition] = Lost(offset, previous, dropped)
        else:
            lost.offset = min(lost.offset, offset)
            lost.previous = max(lost.previous, previous)
            lost.dropped += dropped

    # -- supplied by the other pieces ---------------------------------------------------------
    @abstractmethod
    async def _check_slot_config(self, partitions: int) -> None:
        """relay_slots.SlotOwnership: refuse a partition count other relays do not share."""

    @abstractmethod
    async def _ensure_producer(self) -> AIOKafkaProducer:
        """relay_kafka.KafkaLink: the producer, connected (KafkaUnavailable if Kafka is not)."""

    @abstractmethod
    async def _ends(self, partitions: list[int]) -> dict[int, int]:
        """relay_kafka.KafkaLink: each partition's end offset (its high watermark), fetched."""

    @abstractmethod
    async def _touch(self, probe: AIOKafkaConsumer, partitions: list[int]) -> None:
        """relay_kafka.KafkaLink: fetch once from each partition before producing to it."""

    def lease_valid(self, partition: int) -> bool:
        """May this relay still send to `partition`? Only before its lease's local deadline:
        the lease's length from before the renewal was asked for, less a margin."""
        return partition in self.owned and lease_clock() < self._until.get(partition, 0.0)

    def _lease_margin(self) -> float:
        return min(1.0, self.s.relay_lease_s * 0.2)

    @abstractmethod
    async def renew(self) -> None:
        """relay_slots.SlotOwnership: renew the leases still held, drop the ones taken."""

    @abstractmethod
    async def _lost_leases(self, partitions: set[int], why: str) -> None:
        """relay_slots.SlotOwnership: forget partitions whose lease another relay holds now."""

    @abstractmethod
    async def _send_partition(
        self, producer: AIOKafkaProducer, partition: int, rows: Sequence[Row]
    ) -> Sent:
        """relay_kafka.KafkaLink: send one partition's rows in order, up to the first failure."""


@dataclass
class Sent:
    """One partition's sends in a round: the acked prefix with offsets, the error that stopped
    it, or `fenced`: its lease ran out before the next batch, so nothing more was sent."""

    partition: int
    acked: list[tuple[Row, int]]
    error: str | None = None
    fenced: bool = False
