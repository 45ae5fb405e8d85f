"""The outbox relay: unpublished outbox rows -> Kafka (acks=all) -> rows marked published.

Ownership. The slots are the audit topic's Kafka partitions: a session's rows go to partition
session_hash % partitions (Kafka's own key partitioning). A relay publishes a partition's rows
only while it holds that partition's Postgres advisory lock, on a connection kept for that
purpose. Locks die with the connection, so a crashed relay's partitions are free at once; live
relays share them evenly (each takes ceil(partitions / relays)). So a session's rows, and a
partition's records, are written by one relay at a time. (One writer per partition is also
what Tansu needs: concurrent producers to one partition there get overlapping offsets.)

No skipped rows. The relay never reads "id > last id". Each round selects rows still marked
unpublished, in id order, so a transaction that commits late, holding low ids, is simply found
by the next round. (ARCHITECTURE.md explains why this also keeps causal order per session.)

Order. A session maps to one Kafka partition (key = session id). Each round sends one explicit
record batch per partition at a time and waits for its ack before the next; the first failed
batch stops that partition for the round, and only the acked prefix is marked. So nothing
after a failure reaches Kafka before it, and a re-send repeats rows in their original order.

At-least-once. A crash after the ack and before the mark re-sends those rows: duplicates carry
the same event id, and readers (replay) keep the first copy.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agentmesh.outbox import kafka
from agentmesh.process import faults
from agentmesh.settings import Settings

log = structlog.get_logger("agentmesh.relay")

SLOT_LOCK_CLASS = 0x6D657372  # "mesr": (class, slot) advisory locks, one per owned slot
MEMBER_LOCK_CLASS = 0x6D65736D  # "mesm": every live relay holds (class, 0) in share mode
PRUNE_LOCK_CLASS = 0x6D657370  # "mesp": one pruner at a time

_FETCH_SQL = """
SELECT id, event_id::text AS event_id, session_id, type, envelope, agent, causation_id,
       schema_version, session_hash
FROM mesh_outbox
WHERE published_at IS NULL AND session_hash % $1 = ANY($2::int[])
  AND NOT (id = ANY($4::bigint[]))  -- acked rows whose mark is still being written
ORDER BY id
LIMIT $3
"""

#: A session's next records extend its last index range when they start at most this many
#: records after its end; otherwise they open a new range (replay seeks to each range).
INDEX_GAP = 500

_MARK_SQL = """
WITH marked AS (
    UPDATE mesh_outbox o
    SET published_at = now(), kafka_topic = $1, kafka_partition = u.p, kafka_offset = u.off
    FROM unnest($2::bigint[], $3::int[], $4::bigint[]) AS u(id, p, off)
    WHERE o.id = u.id
    RETURNING o.session_id, u.p, u.off
),
runs AS (  -- split a session's offsets into runs wherever a gap is wider than $5
    SELECT session_id, p, off,
           count(*) FILTER (WHERE gap > $5) OVER (PARTITION BY session_id, p ORDER BY off)
               AS run
    FROM (SELECT session_id, p, off,
                 off - lag(off) OVER (PARTITION BY session_id, p ORDER BY off) AS gap
          FROM marked) g
),
agg AS (
    SELECT session_id, p, run, min(off) AS lo, max(off) AS hi, count(*) AS n
    FROM runs GROUP BY session_id, p, run
),
latest AS (
    SELECT DISTINCT ON (ix.session_id, ix.kafka_partition)
           ix.session_id, ix.kafka_partition, ix.first_offset, ix.last_offset
    FROM mesh_audit_index ix
    JOIN agg a ON ix.topic = $1 AND ix.session_id = a.session_id AND ix.kafka_partition = a.p
                AND a.run = 0
    ORDER BY ix.session_id, ix.kafka_partition, ix.first_offset DESC
),
extended AS (
    UPDATE mesh_audit_index ix
    SET last_offset = GREATEST(ix.last_offset, a.hi), records = ix.records + a.n,
        updated_at = now()
    FROM agg a JOIN latest l ON l.session_id = a.session_id AND l.kafka_partition = a.p
    WHERE a.run = 0 AND ix.topic = $1 AND ix.session_id = a.session_id
      AND ix.kafka_partition = a.p AND ix.first_offset = l.first_offset AND a.lo >= l.first_offset
      AND a.lo - l.last_offset <= $5
    RETURNING ix.session_id, ix.kafka_partition
)
INSERT INTO mesh_audit_index AS ix (topic, session_id, kafka_partition, first_offset,
                                    last_offset, records)
SELECT $1, a.session_id, a.p, a.lo, a.hi, a.n FROM agg a
WHERE a.run > 0 OR NOT EXISTS (
    SELECT 1 FROM extended e WHERE e.session_id = a.session_id AND e.kafka_partition = a.p)
ON CONFLICT (topic, session_id, kafka_partition, first_offset) DO UPDATE
SET last_offset = GREATEST(ix.last_offset, EXCLUDED.last_offset),
    records = ix.records + EXCLUDED.records,
    updated_at = now()
"""

_BACKLOG_SQL = """
SELECT count(*) AS rows,
       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest_s
FROM mesh_outbox WHERE published_at IS NULL
"""

_PRUNE_SQL = """
DELETE FROM mesh_outbox WHERE id IN (
    SELECT id FROM mesh_outbox
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
    LIMIT $2)
"""


class SlotConfigMismatch(RuntimeError):
    pass


class KafkaUnavailable(RuntimeError):
    """Kafka did not answer. (Not an OSError, unlike TimeoutError: that would be taken for a
    Postgres outage, and the Kafka clients would not be rebuilt.)"""


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
        return [(k, v.encode()) for k, v in zip(kafka.HEADERS, values, strict=True)]


@dataclass
class RoundResult:
    published: int = 0
    failed_partitions: dict[int, str] = field(default_factory=dict)


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
        self.pruned = Counter("mesh_outbox_pruned", "Published rows pruned", registry=r)
        self.round_seconds = Histogram(
            "mesh_relay_round_seconds",
            "One relay round: read, send, wait for acks, mark",
            registry=r,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )


class Relay:
    """One relay process's worth of work. `run(stop)` until `stop` is set; several relays may
    run at once. `drain=True` takes every free slot, and `member=False` keeps the relay out
    of the head count that sets each relay's share (both for one-shot commands)."""

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
        self._wake = asyncio.Event()
        self._marking: asyncio.Task[None] | None = None  # the previous round's mark
        self._marking_ids: list[int] = []
        self.slots = 0  # the topic's partition count, once Kafka told it

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.s.postgres_dsn, min_size=1, max_size=3)
        await self._connect_locks()

    async def prepare(self) -> None:
        """Kafka side: the topic set up, a producer connected, the partitions known."""
        await self._ensure_producer()

    async def close(self) -> None:
        try:
            await self.settle()
        except Exception as exc:  # Postgres gone: those rows stay unpublished, sent again
            log.warning("relay: the last mark failed; its rows will be sent again", error=str(exc))
        await self._reset_producer()
        if self._lock_conn is not None and not self._lock_conn.is_closed():
            await self._lock_conn.close()  # releases every slot at once
        self._lock_conn = None
        self.owned.clear()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def _check_slot_config(self, partitions: int) -> None:
        assert self.pool is not None
        slots = await self.pool.fetchval(
            """INSERT INTO mesh_relay_config (slots) VALUES ($1)
               ON CONFLICT (id) DO UPDATE SET slots = mesh_relay_config.slots
               RETURNING slots""",
            partitions,
        )
        if slots != partitions:
            raise SlotConfigMismatch(
                f"relays share {slots} partitions but {self.s.audit_topic} has {partitions}; "
                "after changing a topic's partitions, stop every relay, "
                "DELETE FROM mesh_relay_config, then start them again"
            )

    async def _connect_locks(self) -> None:
        conn = await asyncpg.connect(self.s.postgres_dsn)
        if self.member:
            await conn.execute("SELECT pg_advisory_lock_shared($1, 0)", MEMBER_LOCK_CLASS)
        await conn.add_listener("mesh_outbox", lambda *_: self._wake.set())
        self._lock_conn = conn
        self.owned.clear()

    async def _ensure_producer(self) -> AIOKafkaProducer:
        try:
            return await self._connect_kafka()
        except OSError as exc:  # asyncio timeouts and socket errors from the Kafka clients
            raise KafkaUnavailable(_describe(exc)) from exc

    async def _connect_kafka(self) -> AIOKafkaProducer:
        if self._producer is None:
            if self.s.kafka_create_topics:
                await kafka.ensure_topic(self.s)
            p = kafka.producer(self.s)
            try:
                await p.start()
            except Exception:
                await _stop_quietly(p)
                raise
            self._producer = p
        if self.s.kafka_touch_partitions and self._probe is None:
            probe = kafka.probe_consumer(self.s)
            try:
                await probe.start()
            except Exception:
                await _stop_quietly(probe)
                raise
            self._probe = probe
        if not self._partitions:
            parts = sorted(await self._producer.partitions_for(self.s.audit_topic))
            if parts != list(range(len(parts))):
                raise SlotConfigMismatch(f"{self.s.audit_topic} has partitions {parts}")
            if self.slots != len(parts):
                await self._check_slot_config(len(parts))
                self.slots = len(parts)
            self._partitions = parts
        return self._producer

    async def _reset_producer(self) -> None:
        p, self._producer, self._partitions = self._producer, None, []
        probe, self._probe = self._probe, None
        for client in (p, probe):
            if client is not None:
                await _stop_quietly(client)

    # -- slots --------------------------------------------------------------------------------
    async def rebalance(self) -> None:
        """Take free slots up to a fair share, give back any above it."""
        if not self.slots:
            await self._ensure_producer()
        conn = self._lock_conn
        if conn is None or conn.is_closed():
            self.owned.clear()
            await self._connect_locks()
            conn = self._lock_conn
            assert conn is not None
        self.relays = max(
            1,
            await conn.fetchval(
                """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                   AND classid = $1 AND objid = 0 AND objsubid = 2""",
                MEMBER_LOCK_CLASS,
            ),
        )
        fair = self._fair_share()
        if len(self.owned) > fair:
            for slot in sorted(self.owned)[fair:]:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", SLOT_LOCK_CLASS, slot)
                self.owned.discard(slot)
        elif len(self.owned) < fair:
            order = list(range(self.slots))
            random.shuffle(order)  # relays starting together try different slots first
            for slot in order:
                if len(self.owned) >= fair:
                    break
                if slot in self.owned:
                    continue
                if await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", SLOT_LOCK_CLASS, slot
                ):
                    self.owned.add(slot)
        self.metrics.slots_owned.set(len(self.owned))
        self.metrics.relays.set(self.relays)

    def _fair_share(self) -> int:
        return self.slots if self.drain else math.ceil(self.slots / self.relays)

    def share_missing(self) -> bool:
        return len(self.owned) < self._fair_share()

    # -- one round ----------------------------------------------------------------------------
    async def fetch(self) -> list[Row]:
        assert self.pool is not None
        if not self.owned:
            return []
        recs = await self.pool.fetch(
            _FETCH_SQL, self.slots, sorted(self.owned), self.s.relay_batch_size, self._marking_ids
        )
        return [Row(**dict(r)) for r in recs]

    async def round(self, *, pipelined: bool = False) -> RoundResult:
        """Read the owned slots' oldest unpublished rows, send them, mark the acked ones.

        `pipelined`: leave the mark running while the next round reads and sends (the next
        round skips these rows, and waits for this mark before it starts its own). Only after
        a round in which every batch was acked: after a failure nothing may overtake."""
        rows = await self.fetch()
        res = RoundResult()
        if not rows:
            await self.settle()
            return res
        started = time.perf_counter()
        producer = await self._ensure_producer()
        by_partition: dict[int, list[Row]] = {}
        for row in rows:  # the slot is the partition: Kafka's own key partitioning
            by_partition.setdefault(row.session_hash % self.slots, []).append(row)
        if self._probe is not None:
            await self._touch(self._probe, list(by_partition))
        sent = await asyncio.gather(
            *(self._send_partition(producer, p, rs) for p, rs in by_partition.items())
        )
        ids: list[int] = []
        parts: list[int] = []
        offsets: list[int] = []
        for p, acked, error in sent:
            for row, off in acked:
                ids.append(row.id)
                parts.append(p)
                offsets.append(off)
            if error is not None:
                res.failed_partitions[p] = error
        await self.settle()  # marks stay in order: the previous round's first
        if ids:
            faults.point("relay_after_ack")
            if pipelined and not res.failed_partitions:
                self._marking = asyncio.create_task(self._mark(ids, parts, offsets))
                self._marking_ids = ids
            else:
                await self._mark(ids, parts, offsets)
        res.published = len(ids)
        self.metrics.round_seconds.observe(time.perf_counter() - started)
        return res

    async def _mark(self, ids: list[int], parts: list[int], offsets: list[int]) -> None:
        assert self.pool is not None
        await self.pool.execute(_MARK_SQL, self.s.audit_topic, ids, parts, offsets, INDEX_GAP)
        self.metrics.published.inc(len(ids))

    async def settle(self) -> None:
        """Wait for the pipelined mark, if one is running (raises what it raised)."""
        task, self._marking = self._marking, None
        if task is not None:
            try:
                await task
            finally:
                self._marking_ids = []

    async def _touch(self, probe: AIOKafkaConsumer, partitions: list[int]) -> None:
        """Fetch from each partition before producing to it (Settings.kafka_touch_partitions).

        Tansu restarts a partition at offset 0, overwriting acked records, when it is produced
        to before anything fetched from it since the broker started; a fetch makes it load its
        high watermark. ListOffsets does not. On Apache Kafka this is one cheap fetch."""
        try:
            await self._fetch_once(probe, partitions)
        except OSError as exc:
            raise KafkaUnavailable(_describe(exc)) from exc

    async def _fetch_once(self, probe: AIOKafkaConsumer, partitions: list[int]) -> None:
        tps = [TopicPartition(self.s.audit_topic, p) for p in partitions]
        probe.assign(tps)
        for tp in tps:
            probe.seek(tp, max(0, self._high.get(tp.partition, 0)))
        deadline = time.monotonic() + self.s.kafka_request_timeout_ms / 1000
        try:
            while any(probe.highwater(tp) is None for tp in tps):
                if time.monotonic() > deadline:
                    raise KafkaUnavailable("no fetch answer from Kafka for the partition probe")
                await probe.getmany(*tps, timeout_ms=5, max_records=1)
        finally:
            probe.unsubscribe()  # no background fetching between rounds

    async def _send_partition(
        self, producer: AIOKafkaProducer, partition: int, rows: Sequence[Row]
    ) -> tuple[int, list[tuple[Row, int]], str | None]:
        """Send rows as consecutive record batches, each after the previous one's ack; stop at
        the first failure. Returns the acked prefix with offsets, and the error if any."""
        acked: list[tuple[Row, int]] = []
        last = self._high.get(partition, -1)
        i = 0
        while i < len(rows):
            batch = producer.create_batch()
            chunk: list[Row] = []
            while i < len(rows):
                row = rows[i]
                meta = batch.append(
                    key=row.session_id.encode(),
                    value=row.envelope.encode(),
                    timestamp=None,
                    headers=row.headers(),
                )
                if meta is None:
                    if not chunk:
                        raise ValueError(f"outbox row {row.id} does not fit in one record batch")
                    break
                chunk.append(row)
                i += 1
            batch.close()
            try:
                fut = await producer.send_batch(batch, self.s.audit_topic, partition=partition)
                meta = await fut
            except Exception as exc:
                self.metrics.send_failures.inc()
                return partition, acked, f"{type(exc).__name__}: {exc}"
            if meta.offset <= last:
                self.metrics.offset_regressions.inc()
                log.error(
                    "relay: the broker handed out an offset it had already acked; records at "
                    "and after it may have been overwritten (`mesh outbox republish --since`)",
                    partition=partition,
                    offset=meta.offset,
                    previous=last,
                )
            last = meta.offset + len(chunk) - 1
            self._high[partition] = last
            acked.extend((row, meta.offset + k) for k, row in enumerate(chunk))
        return partition, acked, None

    # -- housekeeping -------------------------------------------------------------------------
    async def backlog(self) -> tuple[int, float]:
        assert self.pool is not None
        r = await self.pool.fetchrow(_BACKLOG_SQL)
        assert r is not None
        self.metrics.backlog_rows.set(r["rows"])
        self.metrics.backlog_age.set(r["oldest_s"])
        return int(r["rows"]), float(r["oldest_s"])

    async def prune(self, chunk: int = 5000) -> int:
        """Delete published rows past the retention (one relay at a time)."""
        assert self.pool is not None
        total = 0
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, 0)", PRUNE_LOCK_CLASS):
                return 0
            try:
                while True:
                    status = await conn.execute(_PRUNE_SQL, self.s.outbox_retention_s, chunk)
                    n = int(status.split()[-1])
                    total += n
                    if n < chunk:
                        break
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, 0)", PRUNE_LOCK_CLASS)
        self.metrics.pruned.inc(total)
        return total

    # -- the loop -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set. Kafka or Postgres outages back off and retry; slots
        are re-shared every `relay_rebalance_interval_s` (sooner while below a fair share).
        Backlog metrics and pruning run beside the rounds, so they stay current while a round
        waits on a broker that is down."""
        housekeeping = asyncio.create_task(self._housekeeping(stop))
        try:
            await self._rounds(stop)
        finally:
            housekeeping.cancel()
            try:
                await housekeeping
            except asyncio.CancelledError:
                pass

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        next_prune = 0.0
        while not stop.is_set():
            try:
                await self.backlog()
                if time.monotonic() >= next_prune and self.s.outbox_retention_s > 0:
                    await self.prune()
                    next_prune = time.monotonic() + self.s.outbox_prune_interval_s
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("relay: housekeeping failed", error=str(exc))
            await _sleep_or_stop(stop, 2.0)

    async def _rounds(self, stop: asyncio.Event) -> None:
        backoff = 0.0
        next_rebalance = 0.0
        while not stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_rebalance:
                    await self.settle()  # partitions are given back only fully marked
                    await self.rebalance()
                    fast = self.share_missing()
                    next_rebalance = now + (0.5 if fast else self.s.relay_rebalance_interval_s)
                self._wake.clear()
                if self.owned:
                    await self._ensure_producer()
                res = await self.round(pipelined=True)
            except SlotConfigMismatch:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                backoff = self._next_backoff(backoff)
                log.warning("relay: postgres unavailable", error=str(exc), retry_in=backoff)
                if self._lock_conn is not None and self._lock_conn.is_closed():
                    self.owned.clear()
                    self._lock_conn = None
                await _sleep_or_stop(stop, backoff)
                continue
            except Exception as exc:  # Kafka: start, metadata or topic set-up failed
                self.kafka_ok = False
                backoff = self._next_backoff(backoff)
                log.warning("relay: kafka unavailable", error=_describe(exc), retry_in=backoff)
                await self._reset_producer()
                await _sleep_or_stop(stop, backoff)
                continue
            if res.failed_partitions:
                self.kafka_ok = False
                backoff = self._next_backoff(backoff)
                log.warning(
                    "relay: kafka did not ack",
                    published=res.published,
                    partitions=sorted(res.failed_partitions),
                    error=next(iter(res.failed_partitions.values())),
                    retry_in=backoff,
                )
                # A new producer (and partition probe) for the next round: the broker may come
                # back as a new process, and the topic may have to be set up again.
                await self._reset_producer()
                await _sleep_or_stop(stop, backoff)
                continue
            self.kafka_ok = self._producer is not None or self.kafka_ok
            backoff = 0.0
            if res.published >= self.s.relay_batch_size:
                continue  # a full batch: more is probably waiting
            try:
                await self.settle()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("relay: postgres unavailable", error=str(exc))
                continue
            await self._idle(stop)
        try:
            await self.settle()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("relay: the last mark failed; its rows will be sent again", error=str(exc))

    def _next_backoff(self, current: float) -> float:
        return min(self.s.relay_retry_max_s, max(0.2, current * 2))

    async def _idle(self, stop: asyncio.Event) -> None:
        """Sleep until NOTIFY, the poll interval, or stop."""
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.s.relay_poll_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()

    async def drain_until(self, done: Any, stop: asyncio.Event | None = None) -> None:
        """Run rounds until the awaitable predicate `done()` is true (for one-shot commands)."""
        stop = stop or asyncio.Event()
        task = asyncio.create_task(self.run(stop))
        try:
            while not await done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await task


async def _stop_quietly(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Stop a client whose broker may be gone. aiokafka can raise the broker error, or the
    CancelledError of its own internal tasks, from stop(); neither may end the relay. A
    cancellation of the relay itself still propagates."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:
        pass


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):  # not wait_for: it can swallow a cancel on 3.11
            await stop.wait()
    except TimeoutError:
        pass


async def serve(s: Settings) -> None:
    """`mesh relay run`: one relay process with /healthz, /readyz and /metrics, until SIGTERM
    or SIGINT. In-flight rounds finish (acks awaited, rows marked) before it exits."""
    import signal

    from agentmesh.process.health import HealthServer

    relay = Relay(s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def live() -> tuple[bool, str]:
        return True, "ok"

    async def ready() -> tuple[bool, str]:
        ok = relay.pool is not None and relay.kafka_ok
        return ok, f"slots={len(relay.owned)} relays={relay.relays} kafka_ok={relay.kafka_ok}"

    http = HealthServer(
        host=s.http_host, port=s.http_port, metrics=relay.metrics.registry, live=live, ready=ready
    )
    port = await http.start()
    log.info("relay starting", name=relay.name, topic=s.audit_topic, http_port=port)
    backoff = 0.0
    try:
        while not stop.is_set():
            try:
                await relay.start()
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                await relay.close()
                backoff = relay._next_backoff(backoff)
                log.warning("relay: postgres unavailable", error=str(exc), retry_in=backoff)
                await _sleep_or_stop(stop, backoff)
        if not stop.is_set():
            await relay.run(stop)
    finally:
        await relay.close()
        await http.stop()
        log.info("relay stopped", name=relay.name)
