"""`mesh projection run NAME`: fold the audit log into a projection's table, live.

Any number of runners of one projection share the topic's partitions the way relays do:
each holds a shared member lock (so each can count the live runners) and an advisory lock per
partition it folds, up to a fair share; a dead runner's locks die with its connection. The
Kafka consumer has no group: it is assigned the owned partitions and seeks to the offsets
stored in Postgres (they are committed with the rows, see projection_apply), so nothing
depends on a broker's consumer-group support. The locks only share the work; correctness
does not rest on them: a batch whose stored offset moved meanwhile is not applied.

Folding to the end without locks (a rebuild, a catch-up in-process) is in projection_rebuild.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from agentmesh import connect
from agentmesh.outbox.projection import Projection
from agentmesh.outbox.projection_apply import (
    MEMBER_CLASS,
    PART_CLASS,
    ProjectionError,
    Stale,
    apply_batch,
    ensure,
    key,
    positions,
)
from agentmesh.settings import Settings

log = structlog.get_logger("agentmesh.projection")


def group_less_consumer(s: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **connect.kafka_kwargs(s),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=s.kafka_request_timeout_ms,
        client_id="agentmesh-projection",
    )


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise ProjectionError(f"Kafka has no topic {topic!r}")
    return sorted(parts)


@dataclass
class FoldResult:
    generation: int
    records: int = 0
    folded: int = 0
    duplicates: int = 0
    skipped: int = 0


class ProjectionRunner:
    """One live runner of one projection (one process may run one per projection)."""

    def __init__(self, s: Settings, projection: Projection) -> None:
        self.s = s
        self.p = projection
        self.generation = 0
        self.owned: set[int] = set()
        self.next: dict[int, int] = {}
        self.partitions: list[int] = []
        self.runners = 1
        self.stats = FoldResult(generation=0)
        self._pool: asyncpg.Pool | None = None
        self._locks: asyncpg.Connection | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._pool = await connect.pg_pool(self.s, min_size=1, max_size=2)
        async with self._pool.acquire() as conn:
            self.generation = await ensure(conn, self.p, self.s.audit_topic)
        self._consumer = group_less_consumer(self.s)
        await self._consumer.start()
        self.partitions = await topic_partitions(self._consumer, self.s.audit_topic)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with suppress(KafkaError, OSError):
                await consumer.stop()
        self._drop_locks()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def run(self, stop: asyncio.Event) -> None:
        """Fold until `stop` is set; Postgres or Kafka outages are waited out."""
        next_rebalance = 0.0
        backoff = 0.2
        while not stop.is_set():
            try:
                if time.monotonic() >= next_rebalance:
                    await self.rebalance()
                    next_rebalance = time.monotonic() + self.s.projection_rebalance_interval_s
                if not self.owned:
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)
                    continue
                await self.step()
                backoff = 0.2
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError) as exc:
                log.warning("projection step failed; retrying", projection=self.p.name,
                            error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                self._drop_locks()
                next_rebalance = 0.0
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def step(self) -> int:
        """One fetch from the owned partitions, each partition's records applied in one
        transaction; the records read."""
        assert self._consumer is not None and self._pool is not None
        tps = [TopicPartition(self.s.audit_topic, p) for p in sorted(self.owned)]
        got = await self._consumer.getmany(
            *tps, timeout_ms=int(self.s.projection_poll_interval_s * 1000),
            max_records=self.s.projection_batch_size,
        )  # fmt: skip
        n = 0
        for tp, records in got.items():
            if tp.partition not in self.owned:
                continue
            records = [r for r in records if r.offset >= self.next[tp.partition]]
            if not records:
                continue
            n += len(records)
            await self._apply(tp.partition, records)
        if n and self.p.after_commit is not None:
            try:
                await self.p.after_commit(self._pool, self.p.table_of(self.generation),
                                          sorted(self.owned))  # fmt: skip
            except Exception as exc:  # its work (a snapshot) waits for the next batch
                log.warning("projection after-commit step failed", projection=self.p.name,
                            error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        return n

    async def _apply(self, partition: int, records: Sequence[object]) -> None:
        assert self._pool is not None and self._consumer is not None
        try:
            done = await apply_batch(self._pool, self.p, self.generation, partition,
                                     self.next[partition], records)  # fmt: skip
        except Stale as st:
            if st.generation != self.generation:
                log.info("projection rebuilt: moving to the new generation",
                         projection=self.p.name, generation=st.generation)  # fmt: skip
                self.generation = st.generation
                await self._seek(sorted(self.owned))
            else:
                await self._seek([partition])
            return
        self.next[partition] = done.next_offset
        self.stats.records += len(records)
        self.stats.folded += done.folded
        self.stats.duplicates += done.duplicates
        self.stats.skipped += done.skipped

    async def _seek(self, parts: list[int]) -> None:
        """Positions from Postgres, and the consumer sought there."""
        assert self._pool is not None and self._consumer is not None
        async with self._pool.acquire() as conn:
            self.next.update(await positions(conn, self.p.name, self.generation, parts))
        for part in parts:
            self._consumer.seek(TopicPartition(self.s.audit_topic, part), self.next[part])

    def _drop_locks(self) -> None:
        if self._locks is not None and not self._locks.is_closed():
            self._locks.terminate()
        self._locks = None
        self.owned.clear()

    async def rebalance(self) -> None:
        """Take free partitions up to a fair share, give back any above it; follow a rebuild
        (a partition with no new records would not notice it at its next batch)."""
        assert self._consumer is not None and self._pool is not None
        live = await self._pool.fetchval(
            "SELECT generation FROM mesh_projections WHERE name = $1", self.p.name
        )
        if live is not None and live != self.generation:
            log.info("projection rebuilt: moving to the new generation",
                     projection=self.p.name, generation=live)  # fmt: skip
            self.generation = int(live)
            await self._seek(sorted(self.owned))
        if self._locks is None or self._locks.is_closed():
            self.owned.clear()
            conn = await connect.pg_connect(self.s)
            await conn.execute("SELECT pg_advisory_lock_shared($1, $2)", MEMBER_CLASS,
                               key(self.p.name))  # fmt: skip
            self._locks = conn
        conn = self._locks
        self.runners = max(1, int(await conn.fetchval(
            """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND classid = $1 AND objid = $2 AND objsubid = 2""",
            MEMBER_CLASS, key(self.p.name),
        )))  # fmt: skip
        fair = math.ceil(len(self.partitions) / self.runners)
        before = set(self.owned)
        for part in sorted(self.owned)[fair:]:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", PART_CLASS,
                               key(self.p.name, part))  # fmt: skip
            self.owned.discard(part)
        order = list(self.partitions)
        random.shuffle(order)  # runners starting together try different partitions first
        for part in order:
            if len(self.owned) >= fair:
                break
            if part not in self.owned and await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", PART_CLASS, key(self.p.name, part)
            ):
                self.owned.add(part)
        if self.owned != before:
            tps = [TopicPartition(self.s.audit_topic, p) for p in sorted(self.owned)]
            self._consumer.assign(tps)
            await self._seek(sorted(self.owned))
            log.info("projection partitions", projection=self.p.name,
                     owned=sorted(self.owned), runners=self.runners)  # fmt: skip
