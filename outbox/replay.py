"""Replay one session from the Kafka audit log: its events, once each, in order.

Kafka is the source; Postgres is only an index. When the relay recorded where the session's
records are (`mesh_audit_index`: offset ranges with small gaps), replay seeks to each range
of the session's partition in turn, so its cost follows the session's size. Without the
index (Postgres gone, or `use_index=False`) it scans the session's partition: key = session
id, so the partition is known, but every record in it is read.

Duplicates (a relay re-sent rows after a crash, or an operator republished them) carry the
same event id; the first copy is kept, which is also the earliest position in the log.

    replay = await replay_session(settings, "s-123")
    for e in replay.events: print(e.envelope.type)
    state = fold_state(replay.events, AGENTS.values())
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from agentmesh.outbox import kafka
from agentmesh.schemas.envelope import Envelope
from agentmesh.schemas.errors import PoisonMessage
from agentmesh.schemas.registry import Registry
from agentmesh.schemas.registry import registry as default_registry
from agentmesh.settings import Settings

Progress = Callable[[int, int | None], None]
"""Called with (records read, records to read or None when unknown)."""

_FETCH = 2000
_STALL_S = 10.0


class ReplayError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReplayedEvent:
    envelope: Envelope
    partition: int
    offset: int
    copies: int = 1

    def payload(self, registry: Registry = default_registry) -> Any:
        """The payload as its registered model (upcast to the current version), else a dict."""
        if self.envelope.type not in registry:
            return self.envelope.payload
        try:
            return registry.decode(self.envelope.to_wire()).payload
        except PoisonMessage:
            return self.envelope.payload


@dataclass
class Replay:
    session_id: str
    topic: str
    events: list[ReplayedEvent] = field(default_factory=list)
    records_read: int = 0
    duplicates: int = 0
    used_index: bool = False
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (partition, from, to)
    unpublished: int | None = None  # outbox rows of the session not in Kafka yet
    elapsed_s: float = 0.0
    stopped_at: str | None = None  # the --until point, when one cut the timeline


@dataclass(frozen=True)
class Until:
    """Where time travel stops: at (and including) an event id, or at a point in time."""

    event_id: str | None = None
    time: datetime | None = None

    @classmethod
    def parse(cls, text: str) -> Until:
        try:
            return cls(event_id=str(uuid.UUID(text)))
        except ValueError:
            pass
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"--until {text!r} is neither an event id nor an ISO time") from None
        if when.tzinfo is None:
            raise ValueError(f"--until {text!r} needs a time zone (for example {text}Z)")
        return cls(time=when)

    def cut(self, events: list[ReplayedEvent]) -> tuple[list[ReplayedEvent], bool]:
        out: list[ReplayedEvent] = []
        for e in events:
            if self.time is not None and e.envelope.created_at > self.time:
                return out, True
            out.append(e)
            if self.event_id is not None and e.envelope.event_id == self.event_id:
                return out, True
        if self.event_id is not None:
            raise ValueError(f"event {self.event_id} is not part of this session")
        return out, False


async def session_index(
    s: Settings, session_id: str
) -> tuple[list[tuple[int, int, int]], int] | None:
    """The spans the relay recorded for the session, and its unpublished rows; None when
    Postgres cannot be reached."""
    try:
        conn = await asyncpg.connect(s.postgres_dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        rows = await conn.fetch(
            """SELECT kafka_partition, first_offset, last_offset FROM mesh_audit_index
               WHERE topic = $1 AND session_id = $2 ORDER BY kafka_partition, first_offset""",
            s.audit_topic,
            session_id,
        )
        pending = await conn.fetchval(
            "SELECT count(*) FROM mesh_outbox WHERE session_id = $1 AND published_at IS NULL",
            session_id,
        )
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()
    return [(r[0], r[1], r[2]) for r in rows], int(pending)


async def replay_session(
    s: Settings,
    session_id: str,
    *,
    until: Until | None = None,
    use_index: bool = True,
    progress: Progress | None = None,
) -> Replay:
    """Read the session's events from Kafka, dedup by event id, keep log order."""
    started = time.perf_counter()
    rep = Replay(session_id=session_id, topic=s.audit_topic)
    index = await session_index(s, session_id) if use_index else None
    if index is not None:
        rep.unpublished = index[1]
    consumer = kafka.consumer(s)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(s.audit_topic)
        if not partitions:
            await consumer.force_metadata_update()
            partitions = consumer.partitions_for_topic(s.audit_topic)
        if not partitions:
            raise ReplayError(f"Kafka has no topic {s.audit_topic!r}")
        if index is not None and index[0]:
            rep.used_index = True
            rep.spans = index[0]
        else:
            p = kafka.partition_of(session_id, partitions)
            tp = TopicPartition(s.audit_topic, p)
            start = (await consumer.beginning_offsets([tp]))[tp]
            rep.spans = [(p, start, -1)]  # -1: to the end of the partition
        seen: dict[str, int] = {}
        found: list[ReplayedEvent] = []
        key = session_id.encode()
        for p, first, last in rep.spans:
            async for rec in _read_span(consumer, s.audit_topic, p, first, last, rep, progress):
                if rec.key != key:
                    continue
                env = Envelope.model_validate_json(rec.value)
                if env.event_id in seen:
                    rep.duplicates += 1
                    i = seen[env.event_id]
                    prior = found[i]
                    found[i] = ReplayedEvent(
                        prior.envelope, prior.partition, prior.offset, prior.copies + 1
                    )
                    continue
                seen[env.event_id] = len(found)
                found.append(ReplayedEvent(env, p, rec.offset))
    finally:
        await consumer.stop()
    if len({p for p, _, _ in rep.spans}) > 1:  # the partition count changed meanwhile
        found.sort(key=lambda e: (e.envelope.created_at, e.partition, e.offset))
    if until is not None:
        found, cut = until.cut(found)
        if cut and found:
            rep.stopped_at = found[-1].envelope.event_id
    rep.events = found
    rep.elapsed_s = time.perf_counter() - started
    return rep


async def _read_span(
    consumer: AIOKafkaConsumer,
    topic: str,
    partition: int,
    first: int,
    last: int,
    rep: Replay,
    progress: Progress | None,
) -> Any:
    """Records of one partition from `first` to `last` inclusive (-1: to the high watermark).

    The end is taken from the fetch responses' high watermark: Tansu's ListOffsets(latest)
    does not report it, while fetches do (and Apache Kafka agrees with both)."""
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, first)
    position = first
    total = (last - first + 1) if last >= 0 else None
    stalled_since = time.monotonic()
    while True:
        batch = await consumer.getmany(tp, timeout_ms=500, max_records=_FETCH)
        records = batch.get(tp, [])
        high = consumer.highwater(tp)
        if last < 0 and high is not None:
            total = high - first
        for rec in records:
            if last >= 0 and rec.offset > last:
                return
            position = rec.offset + 1
            rep.records_read += 1
            yield rec
        if progress is not None:
            progress(rep.records_read, total)
        end = last + 1 if last >= 0 else high
        if end is not None and position >= end:
            return
        if records:
            stalled_since = time.monotonic()
        elif high is not None and last >= 0 and high <= last:
            raise ReplayError(
                f"the index says the session reaches offset {last} of {topic}[{partition}] but "
                f"the partition ends at {high}: was the topic lost? "
                "(`mesh outbox republish --session` re-sends it)"
            )
        elif time.monotonic() - stalled_since > _STALL_S:
            raise ReplayError(f"Kafka returned nothing from {topic}[{partition}] at {position}")


def fold_state(
    events: Iterable[ReplayedEvent], agents: Iterable[Any], registry: Registry = default_registry
) -> dict[str, Any]:
    """Fold events through the projections the agents declared (`@agent.projection`)."""
    by_type: dict[str, list[Any]] = {}
    for agent in agents:
        for t, fns in agent.projections.items():
            by_type.setdefault(t, []).extend(fns)
    state: dict[str, Any] = {}
    for e in events:
        fns = by_type.get(e.envelope.type)
        if fns:
            payload = e.payload(registry)
            for fn in fns:
                fn(state, payload, e.envelope)
    return state
