"""Replay one session from the Kafka audit log: its events, once each, in causal order.

Kafka is the source; Postgres is only an index. When the relay recorded where the session's
records are (`mesh_audit_index`: offset ranges with small gaps), replay seeks to each range
of the session's partition in turn, so its cost follows the session's size. Without the
index (Postgres gone, or `use_index=False`) it scans the session's partition: key = session
id, so the partition is known, but every record in it is read. An index that points past the
end of a partition (the broker lost records) is not trusted: replay scans instead.

Order. Every record carries its outbox row's id (header `mesh-seq`): within one session, id
order is commit order, and a cause commits before its effects. Events are sorted by it, not
by offset: after the broker lost records, or a republish, copies written later can sit before
older ones. Duplicates (a relay re-sent rows after a crash, or healed a loss, or an operator
republished them) carry the same event id and the same sequence: each event is kept once.
Records older relays wrote have no sequence; they keep their log order (first copy), and are
placed among the sequenced ones by `created_at`.

Gaps. `Replay.missing` lists events the log shows should be there and are not: ids a
`mesh.action` lists as emitted, causes named by `causation_id`, and (when Postgres answers)
rows the outbox marked published to this topic. See `find_missing`.

    replay = await replay_session(settings, "s-123")
    for e in replay.events: print(e.envelope.type)
    state = fold_state(replay.events, AGENTS.values())
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import heapq
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from agentmesh import connect
from agentmesh.outbox import kafka
from agentmesh.schemas.audit import ACTION, OPERATOR
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


class _StaleIndex(Exception):
    """The index names offsets past the end of a partition: records were lost there."""


@dataclass(frozen=True)
class ReplayedEvent:
    envelope: Envelope
    partition: int  # where the first copy read is
    offset: int
    copies: int = 1
    seq: int | None = None  # the outbox row's id (header mesh-seq); None: an older relay's

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
    missing: list[MissingEvent] = field(default_factory=list)  # see find_missing
    stale_index: bool = False  # the index pointed past a partition's end: scanned instead
    after: Cursor | None = None  # read only past this point (a snapshot's); None: everything
    session_ends: dict[int, int] = field(default_factory=dict)  # partition -> last offset read


@dataclass(frozen=True)
class Cursor:
    """Where a session snapshot ends: its last record's partition and offset, and the highest
    mesh-seq folded into it. Replay from a cursor reads only the records after it and keeps
    only events with a higher sequence (copies of older ones are already in the snapshot)."""

    partition: int
    offset: int
    seq: int


@dataclass(frozen=True)
class MissingEvent:
    """An event the log shows should be there, and is not."""

    event_id: str
    why: str  # "emitted" (a mesh.action lists it), "cause" (an event names it as its cause),
    # "published" (the outbox marked it published to this topic)
    named_by: str | None = None  # the event in the log that names it
    type: str | None = None  # known when the outbox still holds the row
    in_outbox: bool | None = None  # None: Postgres was not asked (unreachable)

    def describe(self) -> str:
        """One line: which event, and how the log shows it should be there."""
        what = f"event {self.event_id}" + (f" ({self.type})" if self.type else "")
        if self.why == "emitted":
            how = f"emitted by the action {self.named_by}"
        elif self.why == "cause":
            how = f"the cause of {self.named_by}"
        else:
            how = "marked published in the outbox"
        if self.in_outbox is False:
            how += "; no longer in the outbox (pruned), cannot be re-sent"
        return f"{what}: {how}, not in the log"


@dataclass(frozen=True)
class _OutboxRow:
    type: str
    state: str  # "pending" (not published yet), "here" (published to this topic), "elsewhere"
    seq: int = 0  # the row's id


@dataclass
class _Lookup:
    """What Postgres says about the session, read in one snapshot."""

    spans: list[tuple[int, int, int]]
    unpublished: int
    rows: dict[str, _OutboxRow]  # event id -> the outbox row, in id order


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
    found = await _lookup(s, session_id)
    return None if found is None else (found.spans, found.unpublished)


async def _lookup(s: Settings, session_id: str) -> _Lookup | None:
    """The session's index spans and outbox rows, in one snapshot (a row marked published is
    then covered by the spans: the mark writes both in one statement); None when Postgres
    cannot be reached."""
    try:
        conn = await connect.pg_connect(s, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            spans = await conn.fetch(
                """SELECT kafka_partition, first_offset, last_offset FROM mesh_audit_index
                   WHERE topic = $1 AND session_id = $2 ORDER BY kafka_partition, first_offset""",
                s.audit_topic,
                session_id,
            )
            rows = await conn.fetch(
                """SELECT event_id::text AS event_id, type, id,
                          CASE WHEN published_at IS NULL THEN 'pending'
                               WHEN kafka_topic = $2 THEN 'here' ELSE 'elsewhere' END AS state
                   FROM mesh_outbox WHERE session_id = $1 ORDER BY id""",
                session_id,
                s.audit_topic,
            )
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()
    return _Lookup(
        spans=[(r[0], r[1], r[2]) for r in spans],
        unpublished=sum(1 for r in rows if r["state"] == "pending"),
        rows={r["event_id"]: _OutboxRow(r["type"], r["state"], r["id"]) for r in rows},
    )


async def replay_session(
    s: Settings,
    session_id: str,
    *,
    until: Until | None = None,
    use_index: bool = True,
    progress: Progress | None = None,
    after: Cursor | None = None,
) -> Replay:
    """Read the session's events from Kafka, keep each event once, in causal order, and say
    which events the log shows should be there but are not (`Replay.missing`).

    `use_index=False` scans the session's partition instead of seeking to the ranges the
    index recorded; Postgres is still asked which of the session's rows are published.
    `after` (a snapshot's cursor) reads only the session's records after it; `Replay.after`
    is None when that could not be done (the broker lost records: the whole log was read)."""
    started = time.perf_counter()
    rep = Replay(session_id=session_id, topic=s.audit_topic, after=after)
    found = await _lookup(s, session_id)
    if found is not None:
        rep.unpublished = found.unpublished
    consumer = kafka.consumer(s)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(s.audit_topic)
        if not partitions:
            await consumer.force_metadata_update()
            partitions = consumer.partitions_for_topic(s.audit_topic)
        if not partitions:
            raise ReplayError(f"Kafka has no topic {s.audit_topic!r}")
        home = kafka.partition_of(session_id, partitions)
        if use_index and found is not None and found.spans:
            rep.used_index = True
            rep.spans = found.spans
        else:
            rep.spans = await _whole(consumer, s.audit_topic, [home])
        if after is not None:
            rep.spans = _past(rep.spans, after)
        try:
            events = await _read_events(consumer, rep, progress)
        except _StaleIndex:  # the broker lost records the index points to: scan instead
            parts = sorted({p for p, _, _ in rep.spans} | {home})
            rep.used_index, rep.stale_index, rep.duplicates, rep.after = False, True, 0, None
            rep.spans = await _whole(consumer, s.audit_topic, parts)
            events = await _read_events(consumer, rep, progress)
    finally:
        # a consumer stopped before its background task ever ran (nothing after a snapshot's
        # cursor to read) raises CancelledError from stop(): let that task start first
        await asyncio.sleep(0)
        await consumer.stop()
    events = causal_order(events)
    rows = None if found is None else found.rows
    if rep.after is not None:  # what the snapshot holds is neither read nor missing
        cut = rep.after.seq
        rep.duplicates += sum(1 for e in events if e.seq is not None and e.seq <= cut)
        events = [e for e in events if e.seq is None or e.seq > cut]
        rows = None if rows is None else {k: r for k, r in rows.items() if r.seq > cut}
    rep.missing = find_missing(events, rows)
    if until is not None:
        events, cut = until.cut(events)
        if cut and events:
            rep.stopped_at = events[-1].envelope.event_id
    rep.events = events
    rep.elapsed_s = time.perf_counter() - started
    return rep


def _past(spans: list[tuple[int, int, int]], c: Cursor) -> list[tuple[int, int, int]]:
    """The parts of `spans` after the cursor (in its partition; a snapshot is only taken of a
    session that lives in one partition)."""
    out = []
    for p, first, last in spans:
        if p != c.partition or (0 <= last <= c.offset):
            continue
        out.append((p, max(first, c.offset + 1), last))
    return out


async def _whole(
    consumer: AIOKafkaConsumer, topic: str, partitions: list[int]
) -> list[tuple[int, int, int]]:
    """Spans covering these partitions from their first record to their end (-1)."""
    tps = [TopicPartition(topic, p) for p in partitions]
    starts = await consumer.beginning_offsets(tps)
    return [(tp.partition, starts[tp], -1) for tp in tps]


async def _read_events(
    consumer: AIOKafkaConsumer, rep: Replay, progress: Progress | None
) -> list[ReplayedEvent]:
    """The session's events in `rep.spans`, each once (its first copy), in log order."""
    by_id: dict[str, ReplayedEvent] = {}
    key = rep.session_id.encode()
    for p, first, last in rep.spans:
        async for rec in _read_span(consumer, rep.topic, p, first, last, rep, progress):
            if rec.key != key:
                continue
            rep.session_ends[p] = max(rep.session_ends.get(p, -1), rec.offset)
            env = Envelope.model_validate_json(rec.value)
            seq = _seq(rec.headers)
            prior = by_id.get(env.event_id)
            if prior is None:
                by_id[env.event_id] = ReplayedEvent(env, p, rec.offset, seq=seq)
                continue
            rep.duplicates += 1
            by_id[env.event_id] = dataclasses.replace(
                prior, copies=prior.copies + 1, seq=prior.seq if prior.seq is not None else seq
            )
    return list(by_id.values())


def _seq(headers: Sequence[tuple[str, bytes]] | None) -> int | None:
    for k, v in headers or ():
        if k == kafka.SEQ_HEADER:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def causal_order(events: Iterable[ReplayedEvent]) -> list[ReplayedEvent]:
    """Events with a sequence (`mesh-seq`) sorted by it: the session's commit order, in which
    every cause comes before its effects. Events without one (written by relays older than
    the header) keep their log order (by created_at when they are in several partitions), and
    are merged in among the sequenced ones by created_at."""
    sequenced: list[tuple[int, ReplayedEvent]] = []
    older: list[ReplayedEvent] = []
    for e in events:
        if e.seq is None:
            older.append(e)
        else:
            sequenced.append((e.seq, e))
    ordered = [e for _, e in sorted(sequenced, key=lambda pair: pair[0])]
    if not older:
        return ordered
    if len({e.partition for e in older}) > 1:  # the partition count changed meanwhile
        older.sort(key=lambda e: (e.envelope.created_at, e.partition, e.offset))
    return list(heapq.merge(older, ordered, key=lambda e: e.envelope.created_at))


def find_missing(
    events: Sequence[ReplayedEvent], outbox: dict[str, _OutboxRow] | None = None
) -> list[MissingEvent]:
    """Events the log shows should be there, and are not, from `events` in causal order:

    - every id a `mesh.action` lists as emitted (written in the same transaction as it);
    - the cause (`causation_id`) of every event;
    - with the outbox's rows of the session (`outbox`, when Postgres answered): every row
      marked published to this topic.

    With the outbox, a row still unpublished is on its way, not missing, and a cause the outbox
    never held (an event sent straight onto a stream from outside the mesh, or pruned) is not
    reported. Without it (Postgres unreachable), the log alone decides, and these causes are
    not reported: the session's first event's (it may come from outside the mesh; the events
    it caused name it too), an operator action's (its target may never have passed through
    the outbox), and any event an operator action names (an edited DLQ envelope, put on its
    stream by hand)."""
    present = {e.envelope.event_id for e in events}
    out: dict[str, MissingEvent] = {}

    def add(event_id: str, why: str, named_by: str | None) -> None:
        if event_id in present or event_id in out:
            return
        row = outbox.get(event_id) if outbox is not None else None
        if outbox is not None and (
            (row is None and why == "cause") or (row is not None and row.state == "pending")
        ):
            return
        out[event_id] = MissingEvent(
            event_id=event_id,
            why=why,
            named_by=named_by,
            type=row.type if row is not None else None,
            in_outbox=None if outbox is None else row is not None,
        )

    by_hand = {
        str(e.envelope.payload.get("event_id"))
        for e in events
        if e.envelope.type == OPERATOR and e.envelope.payload.get("event_id")
    }
    first_cause = events[0].envelope.causation_id if events else None
    for e in events:
        env = e.envelope
        if env.type == ACTION:
            emitted = env.payload.get("emitted")
            for event_id in emitted if isinstance(emitted, list) else []:
                if isinstance(event_id, str):
                    add(event_id, "emitted", env.event_id)
        cause = env.causation_id
        if cause is None:
            continue
        if outbox is None and (cause == first_cause or env.type == OPERATOR or cause in by_hand):
            continue
        add(cause, "cause", env.event_id)
    for event_id, row in (outbox or {}).items():
        if row.state == "here":
            add(event_id, "published", None)
    return list(out.values())


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
    does not report it, while fetches do (and Apache Kafka agrees with both). `_StaleIndex`
    when the partition ends before `last`: the broker lost records the index points to."""
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
            raise _StaleIndex(f"{topic}[{partition}] ends at {high}, the index says {last}")
        elif time.monotonic() - stalled_since > _STALL_S:
            raise ReplayError(f"Kafka returned nothing from {topic}[{partition}] at {position}")


def fold_state(
    events: Iterable[ReplayedEvent],
    agents: Iterable[Any],
    registry: Registry = default_registry,
    *,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fold events through the projections the agents declared (`@agent.projection`), from
    `state` (a snapshot's, copied) or from nothing."""
    by_type: dict[str, list[Any]] = {}
    for agent in agents:
        for t, fns in agent.projections.items():
            by_type.setdefault(t, []).extend(fns)
    state = copy.deepcopy(state) if state is not None else {}
    for e in events:
        fns = by_type.get(e.envelope.type)
        if fns:
            payload = e.payload(registry)
            for fn in fns:
                fn(state, payload, e.envelope)
    return state
