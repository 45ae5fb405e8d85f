"""Folding the whole log (or the rest of it) without locks: `mesh projection rebuild NAME`
folds into a fresh generation and swaps it in; `catch_up` folds the live table up to the
log's current end in this process (the demo's summary). Both apply batches by the same
exactly-once rule as live runners (projection_apply), so a live runner folding at the same
time is harmless."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from agentmesh import connect
from agentmesh.outbox.projection import Projection
from agentmesh.outbox.projection_apply import (
    ADMIN_CLASS,
    ProjectionError,
    Stale,
    apply_batch,
    ensure,
    key,
    positions,
    prepare_rebuild,
    swap,
)
from agentmesh.outbox.projection_runner import FoldResult, group_less_consumer, topic_partitions
from agentmesh.settings import Settings

Progress = Callable[[int, int | None], None]
_STALL_S = 15.0


async def fold_to_end(
    s: Settings,
    p: Projection,
    pool: asyncpg.Pool,
    generation: int,
    *,
    live: bool,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold every partition from its stored offset to the end it has now, without locks."""
    result = FoldResult(generation=generation)
    consumer = group_less_consumer(s)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, s.audit_topic)
        async with pool.acquire() as conn:
            start = await positions(conn, p.name, generation, parts)
        for part in parts:
            await _fold_partition(consumer, s, p, pool, part, start[part], result, live, progress)
    finally:
        await consumer.stop()
    return result


async def _fold_partition(
    consumer: AIOKafkaConsumer,
    s: Settings,
    p: Projection,
    pool: asyncpg.Pool,
    part: int,
    position: int,
    result: FoldResult,
    live: bool,
    progress: Progress | None,
) -> None:
    tp = TopicPartition(s.audit_topic, part)
    consumer.assign([tp])
    consumer.seek(tp, position)
    stalled = time.monotonic()
    while True:
        got = await consumer.getmany(tp, timeout_ms=300, max_records=s.projection_batch_size)
        records = [r for r in got.get(tp, []) if r.offset >= position]
        high = consumer.highwater(tp)
        if records:
            try:
                done = await apply_batch(pool, p, result.generation, part, position, records,
                                         live=live)  # fmt: skip
            except Stale as st:
                if st.generation != result.generation or st.next_offset is None:
                    raise ProjectionError(f"projection {p.name} was rebuilt meanwhile") from None
                position = st.next_offset  # a live runner got there first: go on after it
                consumer.seek(tp, position)
                continue
            position = done.next_offset
            result.records += len(records)
            result.folded += done.folded
            result.duplicates += done.duplicates
            result.skipped += done.skipped
            stalled = time.monotonic()
            if progress is not None:
                progress(result.records, None)
        if high is not None and position >= high:
            return
        if not records and time.monotonic() - stalled > _STALL_S:
            raise ProjectionError(f"Kafka returned nothing from {tp.topic}[{part}] at {position}")


@dataclass
class RebuildResult:
    name: str
    old_generation: int
    generation: int
    records: int
    folded: int
    duplicates: int
    skipped: int
    elapsed_s: float


async def rebuild(s: Settings, p: Projection, *, progress: Progress | None = None) -> RebuildResult:
    """Fold the whole log into a fresh table, then swap it in (one transaction)."""
    started = time.perf_counter()
    admin = await connect.pg_connect(s)
    pool = await connect.pg_pool(s, min_size=1, max_size=2)
    try:
        if not await admin.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", ADMIN_CLASS, key(p.name, "rebuild")
        ):
            raise ProjectionError(f"a rebuild of {p.name} is already running")
        old, new = await prepare_rebuild(admin, p, s.audit_topic)
        folded = await fold_to_end(s, p, pool, new, live=False, progress=progress)
        await swap(admin, p, old, new)
    finally:
        await pool.close()
        await admin.close()
    return RebuildResult(
        name=p.name, old_generation=old, generation=new, records=folded.records,
        folded=folded.folded, duplicates=folded.duplicates, skipped=folded.skipped,
        elapsed_s=time.perf_counter() - started,
    )  # fmt: skip


async def catch_up(s: Settings, p: Projection, *, progress: Progress | None = None) -> FoldResult:
    """Fold the live generation up to the log's current end, in this process."""
    pool = await connect.pg_pool(s, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            gen = await ensure(conn, p, s.audit_topic)
        res = await fold_to_end(s, p, pool, gen, live=True, progress=progress)
        if p.after_commit is not None and res.records:
            async with pool.acquire() as conn:
                parts = await conn.fetch(
                    "SELECT kafka_partition FROM mesh_projection_offsets "
                    "WHERE name = $1 AND generation = $2", p.name, gen,
                )  # fmt: skip
            await p.after_commit(pool, p.table_of(gen), [r[0] for r in parts])
        return res
    finally:
        await pool.close()
