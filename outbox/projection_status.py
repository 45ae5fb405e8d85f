"""Where each projection stands: per partition, the offset it folded to, the log's end, the
lag, and which runner (Postgres backend pid of its lock connection) folds it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import asyncpg
from aiokafka import TopicPartition

from agentmesh.outbox import kafka
from agentmesh.outbox.projection_apply import MEMBER_CLASS, PART_CLASS, key
from agentmesh.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    next_offset: int
    end: int | None  # None: Kafka did not answer
    lag: int | None
    runner_pid: int | None  # None: no runner folds it now


@dataclass
class ProjectionStatus:
    name: str
    topic: str
    generation: int
    runners: int
    rows: int | None
    skipped: int
    lag: int | None
    partitions: list[PartitionLag] = field(default_factory=list)


async def ends(s: Settings, partitions: list[int]) -> dict[int, int]:
    """Each partition's end from a fetch (Tansu's ListOffsets(latest) is not reliable)."""
    c = kafka.probe_consumer(s)
    await c.start()
    try:
        tps = [TopicPartition(s.audit_topic, p) for p in partitions]
        if not tps:
            return {}
        c.assign(tps)
        for tp in tps:
            c.seek(tp, 0)
        deadline = time.monotonic() + s.kafka_request_timeout_ms / 1000
        while any(c.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
            await c.getmany(*tps, timeout_ms=50, max_records=1)
        return {tp.partition: int(h) for tp in tps if (h := c.highwater(tp)) is not None}
    finally:
        await c.stop()


async def status(
    s: Settings, pool: asyncpg.Pool, name: str | None = None
) -> list[ProjectionStatus]:
    """Every projection set up in this database (or the one named)."""
    rows = await pool.fetch(
        """SELECT name, topic, generation FROM mesh_projections
           WHERE $1::text IS NULL OR name = $1 ORDER BY name""",
        name,
    )
    out: list[ProjectionStatus] = []
    for r in rows:
        pname, gen = r["name"], r["generation"]
        offsets = {
            o[0]: int(o[1])
            for o in await pool.fetch(
                """SELECT kafka_partition, next_offset FROM mesh_projection_offsets
                   WHERE name = $1 AND generation = $2""",
                pname,
                gen,
            )
        }
        locks = await pool.fetch(
            """SELECT objid::bigint AS k, pid FROM pg_locks WHERE locktype = 'advisory'
               AND granted AND objsubid = 2 AND classid = $1""",
            PART_CLASS,
        )
        by_key = {int(x["k"]): int(x["pid"]) for x in locks}
        runners = await pool.fetchval(
            """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND classid = $1 AND objid = $2 AND objsubid = 2""",
            MEMBER_CLASS,
            key(pname),
        )
        skipped = await pool.fetchval(
            "SELECT count(*) FROM mesh_projection_skipped WHERE name = $1 AND generation = $2",
            pname,
            gen,
        )
        table_rows = None
        if await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", pname):
            table_rows = await pool.fetchval(f"SELECT count(*) FROM {pname}")
        st = ProjectionStatus(name=pname, topic=r["topic"], generation=gen, runners=int(runners),
                              rows=table_rows, skipped=int(skipped), lag=None)  # fmt: skip
        parts = sorted(offsets)
        if r["topic"] == s.audit_topic:
            try:
                end = await ends(s, parts) if parts else {}
            except OSError:
                end = {}
        else:
            end = {}
        for part in parts:
            e = end.get(part)
            lag = None if e is None else max(0, e - offsets[part])
            st.partitions.append(PartitionLag(part, offsets[part], e, lag,
                                              by_key.get(key(pname, part))))  # fmt: skip
        lags = [p.lag for p in st.partitions]
        st.lag = None if any(v is None for v in lags) else sum(v for v in lags if v is not None)
        out.append(st)
    return out
