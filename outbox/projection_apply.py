"""The exactly-once rule of a projection, in one transaction per batch of one partition:

1. `SELECT generation ... FOR SHARE`: a rebuild's swap (FOR UPDATE) waits for the batch, and a
   batch after the swap sees the new generation and is not applied to the old one;
2. move the partition's stored offset from the one this runner read from to the batch's end,
   `WHERE next_offset = <expected>`: if another runner (a replica that took the partition
   over, a runner that was thought dead) moved it first, nothing is applied (`Stale`);
3. insert the batch's event ids into mesh_projection_applied, `ON CONFLICT DO NOTHING
   RETURNING`: only the ids returned are folded (the relay may have published one twice);
4. fold them in log order through the user's function, on the same connection;
5. commit. A crash anywhere before it leaves no trace; after it, the offset says so.

A fold that raises something other than a lost connection or a serialization failure refuses
its event: the batch is run again with a savepoint around each fold, and each refused event is
recorded in mesh_projection_skipped (it fails alone). A record that is not an envelope is
recorded there too.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import ValidationError

from agentmesh.outbox import kafka
from agentmesh.outbox.projection import Projection, ProjectionTx
from agentmesh.outbox.replay import ReplayedEvent
from agentmesh.process import faults
from agentmesh.schemas.envelope import Envelope

PART_CLASS = 0x6D657070  # "mepp": (class, key(name, partition)), the partition's runner
MEMBER_CLASS = 0x6D65706D  # "mepm": (class, key(name)) held shared by every live runner
ADMIN_CLASS = 0x6D657061  # "mepa": (class, key(name)) creation and rebuild


def key(*parts: object) -> int:
    """A positive int4 for an advisory lock's second half."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class ProjectionError(RuntimeError):
    pass


class Stale(Exception):
    """Another runner moved the partition first, or a rebuild swapped the generation."""

    def __init__(self, generation: int, next_offset: int | None) -> None:
        super().__init__(f"generation {generation}, next offset {next_offset}")
        self.generation = generation
        self.next_offset = next_offset


class _Refused(Exception):
    pass


@dataclass
class Applied:
    next_offset: int
    folded: int = 0
    duplicates: int = 0
    skipped: int = 0


def _transient(exc: BaseException) -> bool:
    return isinstance(
        exc,
        OSError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.TransactionRollbackError
        | asyncpg.exceptions.OperatorInterventionError,
    )


def decode(rec: Any, partition: int) -> ReplayedEvent | str:
    """A record as the event a fold gets, or why it is not one."""
    try:
        env = Envelope.model_validate_json(rec.value)
    except (ValidationError, ValueError, TypeError, RecursionError) as exc:
        return f"not an envelope: {str(exc).splitlines()[0][:200]}"
    seq = None
    for k, v in rec.headers or ():
        if k == kafka.SEQ_HEADER:
            try:
                seq = int(v)
            except ValueError:
                seq = None
    return ReplayedEvent(env, partition, rec.offset, seq=seq)


async def ensure(conn: asyncpg.Connection, p: Projection, topic: str) -> int:
    """The projection's row, its live table and view; the live generation."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", ADMIN_CLASS, key(p.name))
        row = await conn.fetchrow(
            "SELECT topic, generation FROM mesh_projections WHERE name = $1", p.name
        )
        if row is None:
            await conn.execute(
                "INSERT INTO mesh_projections (name, topic) VALUES ($1, $2)", p.name, topic
            )
            gen = 1
        elif row["topic"] != topic:
            raise ProjectionError(
                f"projection {p.name} folds topic {row['topic']!r}, not {topic!r}"
            )
        else:
            gen = int(row["generation"])
        table = p.table_of(gen)
        if await conn.fetchval("SELECT to_regclass($1) IS NULL", table):
            await conn.execute(p.ddl.replace("{table}", table))
            await _point_view(conn, p, table)
    return gen


async def _point_view(conn: asyncpg.Connection, p: Projection, table: str) -> None:
    await conn.execute(f"DROP VIEW IF EXISTS {p.name}")
    await conn.execute(f"CREATE VIEW {p.name} AS SELECT * FROM {table}")


async def positions(
    conn: asyncpg.Connection, name: str, generation: int, partitions: Sequence[int]
) -> dict[int, int]:
    """The stored next offset of each partition (0 for one never folded)."""
    await conn.execute(
        """INSERT INTO mesh_projection_offsets (name, generation, kafka_partition, next_offset)
           SELECT $1, $2, unnest($3::int[]), 0 ON CONFLICT DO NOTHING""",
        name,
        generation,
        list(partitions),
    )
    rows = await conn.fetch(
        """SELECT kafka_partition, next_offset FROM mesh_projection_offsets
           WHERE name = $1 AND generation = $2 AND kafka_partition = ANY($3::int[])""",
        name,
        generation,
        list(partitions),
    )
    return {r[0]: int(r[1]) for r in rows}


async def apply_batch(
    pool: asyncpg.Pool,
    p: Projection,
    generation: int,
    partition: int,
    expected: int,
    records: Sequence[Any],
    *,
    live: bool = True,
) -> Applied:
    """Fold one partition's records (in offset order, none before `expected`) and move its
    offset past them, in one transaction. Raises Stale when someone else got there first."""
    events: list[ReplayedEvent] = []
    bad: list[tuple[int, str]] = []
    for rec in records:
        got = decode(rec, partition)
        if isinstance(got, str):
            bad.append((rec.offset, got))
        elif p.wants(got.envelope.type):
            events.append(got)
    end = records[-1].offset + 1 if records else expected
    async with pool.acquire() as conn:
        try:
            return await _tx(conn, p, generation, partition, expected, end, events, bad, live,
                             careful=False)  # fmt: skip
        except _Refused:
            return await _tx(conn, p, generation, partition, expected, end, events, bad, live,
                             careful=True)  # fmt: skip


async def _tx(
    conn: asyncpg.Connection,
    p: Projection,
    gen: int,
    partition: int,
    expected: int,
    end: int,
    events: list[ReplayedEvent],
    bad: list[tuple[int, str]],
    live: bool,
    *,
    careful: bool,
) -> Applied:
    out = Applied(next_offset=end)
    async with conn.transaction():
        current = await conn.fetchval(
            "SELECT generation FROM mesh_projections WHERE name = $1 FOR SHARE", p.name
        )
        if current is None:
            raise ProjectionError(f"projection {p.name} is not set up")
        if live and current != gen:
            raise Stale(int(current), None)
        moved = await conn.fetchval(
            """UPDATE mesh_projection_offsets SET next_offset = $5, updated_at = now()
               WHERE name = $1 AND generation = $2 AND kafka_partition = $3
                 AND next_offset = $4 RETURNING 1""",
            p.name, gen, partition, expected, end,
        )  # fmt: skip
        if not moved:
            actual = await conn.fetchval(
                """SELECT next_offset FROM mesh_projection_offsets
                   WHERE name = $1 AND generation = $2 AND kafka_partition = $3""",
                p.name, gen, partition,
            )  # fmt: skip
            raise Stale(gen, None if actual is None else int(actual))
        inserted = await conn.fetch(
            """INSERT INTO mesh_projection_applied (name, generation, event_id)
               SELECT $1, $2, unnest($3::text[]) ON CONFLICT DO NOTHING RETURNING event_id""",
            p.name, gen, [e.envelope.event_id for e in events],
        )  # fmt: skip
        fresh = {r[0] for r in inserted}
        todo = []
        for e in events:
            if e.envelope.event_id in fresh:
                fresh.discard(e.envelope.event_id)  # a second copy in the batch is not folded
                todo.append(e)
        out.duplicates = len(events) - len(todo)
        tx = ProjectionTx(conn=conn, table=p.table_of(gen), generation=gen)
        for i, e in enumerate(todo):
            if i == len(todo) // 2:
                faults.point("projection_mid_batch")
            try:
                if careful:
                    async with conn.transaction():
                        await p.apply(e, tx)
                else:
                    await p.apply(e, tx)
                out.folded += 1
            except Exception as exc:
                if _transient(exc):
                    raise
                if not careful:
                    raise _Refused from exc
                bad.append((e.offset, f"{e.envelope.type} {e.envelope.event_id}: "
                                      f"{type(exc).__name__}: {exc}"[:500]))  # fmt: skip
        if bad:
            await conn.executemany(
                """INSERT INTO mesh_projection_skipped
                   (name, generation, kafka_partition, kafka_offset, reason)
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
                [(p.name, gen, partition, off, why) for off, why in bad],
            )
        out.skipped = len(bad)
    return out


async def prepare_rebuild(conn: asyncpg.Connection, p: Projection, topic: str) -> tuple[int, int]:
    """A fresh table for the next generation (anything a crashed rebuild left is dropped):
    (live generation, the one to fold)."""
    old = await ensure(conn, p, topic)
    new = old + 1
    async with conn.transaction():
        await conn.execute(f"DROP TABLE IF EXISTS {p.table_of(new)} CASCADE")
        for t in ("mesh_projection_offsets", "mesh_projection_applied", "mesh_projection_skipped"):
            await conn.execute(f"DELETE FROM {t} WHERE name = $1 AND generation = $2", p.name, new)
        await conn.execute(p.ddl.replace("{table}", p.table_of(new)))
    return old, new


async def swap(conn: asyncpg.Connection, p: Projection, old: int, new: int) -> None:
    """Make `new` the live generation in one transaction: readers see the old rows until the
    commit and the new ones after; live runners' next batch moves to the new generation."""
    async with conn.transaction():
        current = await conn.fetchval(
            "SELECT generation FROM mesh_projections WHERE name = $1 FOR UPDATE", p.name
        )
        if current != old:
            raise ProjectionError(f"projection {p.name} moved to generation {current} meanwhile")
        await _point_view(conn, p, p.table_of(new))
        await conn.execute(
            "UPDATE mesh_projections SET generation = $2, rebuilt_at = now() WHERE name = $1",
            p.name,
            new,
        )
        await conn.execute(f"DROP TABLE IF EXISTS {p.table_of(old)} CASCADE")
        for t in ("mesh_projection_offsets", "mesh_projection_applied", "mesh_projection_skipped"):
            await conn.execute(f"DELETE FROM {t} WHERE name = $1 AND generation = $2", p.name, old)
