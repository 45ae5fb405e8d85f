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
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agentmesh.outbox import kafka
from agentmesh.outbox.relay_metrics import RelayMetrics
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

    def headers(self) -> list[tuple[str, bytes]]:
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
        return out


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
        self.pool: asyncpg.Pool | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._producer: AIOKafkaProducer | None = None
        self._probe: AIOKafkaConsumer | None = None
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
        self.slots = 0  # the topic's partition count, once Kafka told it

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

    @abstractmethod
    async def _send_partition(
        self, producer: AIOKafkaProducer, partition: int, rows: Sequence[Row]
    ) -> tuple[int, list[tuple[Row, int]], str | None]:
        """relay_kafka.KafkaLink: send one partition's rows in order, up to the first failure."""
