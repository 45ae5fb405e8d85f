"""One relay round: read the owned partitions' oldest unpublished rows, send, mark the acked.

Rows are selected by "still unpublished" in id order, never "id > last id", so a transaction
that commits late is found by the next round. Only the acked prefix of each partition is
marked, together with the replay index (mesh_audit_index). The mark may run on while the next
round reads and sends, which skips those rows and waits for the mark before its own.

When the broker lost acked records (relay_heal), the round's mark runs in one transaction with
the heal, after it, and never in the background.

Fencing (relay_slots): a round first renews this relay's leases; it reads and sends only the
partitions whose lease is valid, and its mark checks each partition's lease epoch in the same
statement (a `FOR KEY SHARE` lock on the lease row, which a takeover's `FOR UPDATE` waits for
or skips): rows of a partition another relay took meanwhile are not marked.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from agentmesh.outbox.relay_heal import Healing
from agentmesh.outbox.relay_state import Row, lease_clock
from agentmesh.process import faults

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
WITH held AS (  -- the fence: partitions whose lease is still this relay's, under its epoch
    SELECT kafka_partition AS p FROM mesh_relay_leases
    WHERE topic = $1 AND owner_token = $6
      AND (kafka_partition, epoch) IN (SELECT * FROM unnest($7::int[], $8::bigint[]))
    FOR KEY SHARE
),
marked AS (
    UPDATE mesh_outbox o
    SET published_at = now(), kafka_topic = $1, kafka_partition = u.p, kafka_offset = u.off
    FROM unnest($2::bigint[], $3::int[], $4::bigint[]) AS u(id, p, off)
    WHERE o.id = u.id AND u.p IN (SELECT p FROM held)
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
),
inserted AS (
    INSERT INTO mesh_audit_index AS ix (topic, session_id, kafka_partition, first_offset,
                                        last_offset, records)
    SELECT $1, a.session_id, a.p, a.lo, a.hi, a.n FROM agg a
    WHERE a.run > 0 OR NOT EXISTS (
        SELECT 1 FROM extended e WHERE e.session_id = a.session_id AND e.kafka_partition = a.p)
    ON CONFLICT (topic, session_id, kafka_partition, first_offset) DO UPDATE
    SET last_offset = GREATEST(ix.last_offset, EXCLUDED.last_offset),
        records = ix.records + EXCLUDED.records,
        updated_at = now()
)
SELECT (SELECT count(*) FROM marked) AS marked, ARRAY(SELECT p FROM held) AS held
"""


@dataclass
class RoundResult:
    published: int = 0
    failed_partitions: dict[int, str] = field(default_factory=dict)
    fenced: set[int] = field(default_factory=set)  # partitions whose lease ran out mid-round


class RoundPublisher(Healing):
    """fetch -> send (relay_kafka) -> mark, and `settle` for a mark still running."""

    async def fetch(self) -> list[Row]:
        """The oldest unpublished rows of the partitions this relay may send to now."""
        return await self._read(self._marking_ids)

    async def _read(self, skip: list[int]) -> list[Row]:
        assert self.pool is not None
        parts = [p for p in sorted(self.owned) if self.lease_valid(p)]
        if not parts:
            return []
        recs = await self.pool.fetch(_FETCH_SQL, self.slots, parts, self.s.relay_batch_size, skip)
        return [Row(**dict(r)) for r in recs]

    async def _next_rows(self) -> list[Row]:
        """This round's rows: read while the previous round's sends waited for their acks
        (that round went through whole), else read now. Partitions this relay may no longer
        send to are left out."""
        task, self._prefetch = self._prefetch, None
        if task is None:
            return await self.fetch()
        rows = await task
        self.metrics.read_ahead.inc()
        return [r for r in rows if self.lease_valid(r.session_hash % self.slots)]

    async def drop_prefetch(self) -> None:
        """Forget the rows read ahead: the round they followed did not go through whole, so
        its unsent rows must go first."""
        task, self._prefetch = self._prefetch, None
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # cancelled, or the read failed: nothing to keep
                pass

    async def round(self, *, pipelined: bool = False) -> RoundResult:
        """Read the owned slots' oldest unpublished rows, send them, mark the acked ones.

        `pipelined`: leave the mark running while the next round reads and sends (the next
        round skips these rows, and waits for this mark before it starts its own). Only after
        a round in which every batch was acked: after a failure nothing may overtake."""
        self._forget_given_back()
        try:
            await self.renew()
        except BaseException:
            await self.drop_prefetch()
            raise
        rows = await self._next_rows()
        res = RoundResult()
        if len(rows) < self.s.relay_batch_size:  # caught up in every partition without rows
            self._progressed({p for p in self.owned if self.lease_valid(p)}
                             - {r.session_hash % self.slots for r in rows})  # fmt: skip
        if not rows:
            await self.settle()
            await self._check_ends()  # idle: did the broker lose what it had acked?
            if self._lost:  # a loss found idle, or a heal whose transaction failed last round
                await self._heal_and_mark([], [], [])
            return res
        started = time.perf_counter()
        producer = await self._ensure_producer()
        by_partition: dict[int, list[Row]] = {}
        for row in rows:  # the slot is the partition: Kafka's own key partitioning
            by_partition.setdefault(row.session_hash % self.slots, []).append(row)
        await self._know_high(list(by_partition))
        if self.touching and self._probe is not None:
            await self._touch(self._probe, list(by_partition))
        faults.point("relay_before_send")
        if pipelined and len(rows) >= self.s.relay_batch_size:
            # a backlog: read the next round's rows while these wait for their acks, so the
            # broker is not left idle while Postgres reads (dropped unless this round goes
            # through whole: then nothing it leaves unsent can be overtaken)
            skip = self._marking_ids + [r.id for r in rows]
            self._prefetch = asyncio.create_task(self._read(skip))
        try:
            sent = await asyncio.gather(
                *(self._send_partition(producer, p, rs) for p, rs in by_partition.items())
            )
        except BaseException:
            await self.drop_prefetch()
            raise
        ids: list[int] = []
        parts: list[int] = []
        offsets: list[int] = []
        for one in sent:
            for row, off in one.acked:
                ids.append(row.id)
                parts.append(one.partition)
                offsets.append(off)
            if one.error is not None:
                res.failed_partitions[one.partition] = one.error
            if one.fenced:
                res.fenced.add(one.partition)
        if self._lost or res.failed_partitions or res.fenced:
            await self.drop_prefetch()
        await self.settle()  # marks stay in order: the previous round's first
        if self._lost:  # the broker lost acked records: heal, then mark, in one transaction
            if ids:
                faults.point("relay_after_ack")
            await self._heal_and_mark(ids, parts, offsets)
        elif ids:
            faults.point("relay_after_ack")
            if pipelined and not res.failed_partitions and not res.fenced:
                self._marking = asyncio.create_task(self._mark(ids, parts, offsets))
                self._marking_ids = ids
            else:
                await self._mark(ids, parts, offsets)
        res.published = len(ids)
        self.metrics.round_seconds.observe(time.perf_counter() - started)
        return res

    def _fence(self, parts: list[int]) -> tuple[list[int], list[int]]:
        """The partitions of a mark with the epochs this relay holds them under."""
        held = sorted({p for p in parts if p in self.epochs})
        return held, [self.epochs[p] for p in held]

    async def _mark(self, ids: list[int], parts: list[int], offsets: list[int]) -> None:
        assert self.pool is not None
        r = await self.pool.fetchrow(
            _MARK_SQL, self.s.audit_topic, ids, parts, offsets, INDEX_GAP, self.token,
            *self._fence(parts),
        )  # fmt: skip
        assert r is not None
        await self._marked(ids, parts, int(r["marked"]), set(r["held"]))

    async def _marked(self, ids: list[int], parts: list[int], marked: int, held: set[int]) -> None:
        """After a mark: count it, note progress, and forget partitions it was refused for."""
        self.metrics.published.inc(marked)
        self._progressed(held)
        if refused := set(parts) - held:
            self.metrics.fenced_rows.inc(len(ids) - marked)
            await self._lost_leases(
                refused & self.owned, "a mark was refused: another relay holds a newer epoch"
            )

    def _progressed(self, partitions: set[int]) -> None:
        now = lease_clock()
        for p in partitions & self.owned:
            self._progress[p] = now

    async def _heal_and_mark(self, ids: list[int], parts: list[int], offsets: list[int]) -> None:
        """The heal (relay_heal) and then the mark, in one transaction: the rows acked at
        offsets the broker lost become unpublished before this round's acked rows, some of
        them at those same offsets now, are marked."""
        assert self.pool is not None
        marked, held = 0, set()
        async with self.pool.acquire() as conn, conn.transaction():
            healed = await self._heal(conn)
            if ids:
                r = await conn.fetchrow(
                    _MARK_SQL, self.s.audit_topic, ids, parts, offsets, INDEX_GAP, self.token,
                    *self._fence(parts),
                )  # fmt: skip
                assert r is not None
                marked, held = int(r["marked"]), set(r["held"])
        self._healed(healed)
        if ids:
            await self._marked(ids, parts, marked, held)

    async def settle(self) -> None:
        """Wait for the pipelined mark, if one is running (raises what it raised)."""
        task, self._marking = self._marking, None
        if task is not None:
            try:
                await task
            finally:
                self._marking_ids = []
