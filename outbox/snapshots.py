"""Session snapshots: `mesh replay --state` of a long session starts from a stored state and
reads only the records after it.

The built-in projection `mesh_sessions` (`mesh projection run mesh_sessions`) counts each
session's events; every `MESH_SNAPSHOT_EVERY` events it stores the session's folded state (the
agents' `@agent.projection` functions) in mesh_session_snapshots, with a cursor: the
partition and offset of the last record folded and the highest mesh-seq in it. A new snapshot
is itself made from the previous one plus the records after it.

When a snapshot stands for "every event of the session up to seq S": it is only stored, and
only used, if every outbox row of the session with an id up to S is published at or before the
cursor's offset, and every later row after it (one SQL count, `_COVERS`). A fan-out event that
committed late (a lower id published after a higher one), a republish or a heal fails that test,
and replay then reads the whole session instead: slower, never wrong. Rows pruned from the
outbox (after MESH_OUTBOX_RETENTION_S) can no longer be checked; they are old enough that no
late commit is pending. A state that does not survive a JSON round trip is not snapshotted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from agentmesh import connect
from agentmesh.outbox.projection import Projection, ProjectionTx
from agentmesh.outbox.replay import (
    Cursor,
    Progress,
    Replay,
    ReplayedEvent,
    fold_state,
    replay_session,
)
from agentmesh.schemas.registry import Registry
from agentmesh.schemas.registry import registry as default_registry
from agentmesh.settings import Settings

SESSIONS = "mesh_sessions"

_DDL = """CREATE TABLE {table} (
    session_id       text        PRIMARY KEY,
    kafka_partition  integer     NOT NULL,
    events           bigint      NOT NULL,
    snapshot_events  bigint      NOT NULL DEFAULT 0,
    last_type        text,
    updated_at       timestamptz NOT NULL DEFAULT now())"""

_COVERS = """
SELECT count(*) FILTER (WHERE id <= $2 AND (published_at IS NULL OR kafka_topic IS DISTINCT FROM $3
                        OR kafka_partition <> $4 OR kafka_offset > $5)) AS late,
       count(*) FILTER (WHERE id > $2 AND published_at IS NOT NULL AND kafka_topic = $3
                        AND (kafka_partition <> $4 OR kafka_offset <= $5)) AS early
FROM mesh_outbox WHERE session_id = $1"""


@dataclass(frozen=True)
class Snapshot:
    session_id: str
    cursor: Cursor
    events: int
    state: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass
class StateReplay:
    """A session's state: `replay` holds the events read (after the snapshot, if one was
    used), `events` counts every event folded, the snapshot's included."""

    replay: Replay
    state: dict[str, Any]
    snapshot: Snapshot | None
    events: int


async def load(conn: asyncpg.Connection, topic: str, session_id: str) -> Snapshot | None:
    row = await conn.fetchrow(
        """SELECT seq, kafka_partition, kafka_offset, events, state::text AS state, created_at
           FROM mesh_session_snapshots WHERE topic = $1 AND session_id = $2""",
        topic,
        session_id,
    )
    if row is None:
        return None
    return Snapshot(
        session_id=session_id,
        cursor=Cursor(row["kafka_partition"], row["kafka_offset"], row["seq"]),
        events=row["events"],
        state=json.loads(row["state"]),
        created_at=row["created_at"],
    )


async def covers(conn: asyncpg.Connection, topic: str, session_id: str, c: Cursor) -> bool:
    """Every row of the session up to seq is in Kafka at or before the cursor, none after."""
    row = await conn.fetchrow(_COVERS, session_id, c.seq, topic, c.partition, c.offset)
    return row is not None and row["late"] == 0 and row["early"] == 0


async def _usable(s: Settings, session_id: str) -> Snapshot | None:
    try:
        conn = await connect.pg_connect(s, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        snap = await load(conn, s.audit_topic, session_id)
        if snap is not None and not await covers(conn, s.audit_topic, session_id, snap.cursor):
            return None
        return snap
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()


async def replay_state(
    s: Settings,
    session_id: str,
    agents: Iterable[Any],
    *,
    registry: Registry = default_registry,
    progress: Progress | None = None,
) -> StateReplay:
    """The session's state: from its snapshot plus the records after it when a sound one is
    stored, else from the whole log."""
    snap = await _usable(s, session_id)
    rep = await replay_session(
        s, session_id, progress=progress, after=None if snap is None else snap.cursor
    )
    if rep.after is None:  # the broker lost records: the whole session was read
        snap = None
    base = None if snap is None else snap.state
    state = fold_state(rep.events, agents, registry, state=base)
    return StateReplay(
        replay=rep,
        state=state,
        snapshot=snap,
        events=(0 if snap is None else snap.events) + len(rep.events),
    )


async def take_snapshot(
    s: Settings,
    pool: asyncpg.Pool,
    session_id: str,
    agents: Iterable[Any],
    registry: Registry = default_registry,
) -> Snapshot | None:
    """Store the session's state now (from its previous snapshot and the records after it);
    None when nothing new was read or the state cannot stand for a prefix of the log."""
    sr = await replay_state(s, session_id, agents, registry=registry)
    rep = sr.replay
    parts = set(rep.session_ends) | ({sr.snapshot.cursor.partition} if sr.snapshot else set())
    if not rep.events or rep.missing or len(parts) != 1:
        return None
    if any(e.seq is None for e in rep.events):
        return None
    part = parts.pop()
    seqs = [e.seq for e in rep.events if e.seq is not None]
    if sr.snapshot is not None:
        seqs.append(sr.snapshot.cursor.seq)
    cursor = Cursor(part, rep.session_ends[part], max(seqs))
    try:
        text = json.dumps(sr.state)
    except (TypeError, ValueError):
        return None
    if json.loads(text) != sr.state:
        return None
    async with pool.acquire() as conn, conn.transaction():
        if not await covers(conn, s.audit_topic, session_id, cursor):
            return None
        await conn.execute(
            """INSERT INTO mesh_session_snapshots
                   (topic, session_id, seq, kafka_partition, kafka_offset, events, state)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
               ON CONFLICT (topic, session_id) DO UPDATE SET seq = excluded.seq,
                   kafka_partition = excluded.kafka_partition,
                   kafka_offset = excluded.kafka_offset, events = excluded.events,
                   state = excluded.state, created_at = now()""",
            s.audit_topic, session_id, cursor.seq, cursor.partition, cursor.offset,
            sr.events, text,
        )  # fmt: skip
    return Snapshot(session_id=session_id, cursor=cursor, events=sr.events, state=sr.state)


def session_snapshots(
    s: Settings, agents: Iterable[Any], registry: Registry = default_registry
) -> Projection:
    """The built-in projection `mesh_sessions`: events per session, and a snapshot of each
    session's state every `s.snapshot_every` events."""
    folds = list(agents)
    p = Projection(
        SESSIONS,
        table=_DDL,
        queries={
            "largest": "SELECT session_id, events, snapshot_events, last_type, updated_at "
            "FROM {table} ORDER BY events DESC LIMIT 20"
        },
        register=False,
    )

    @p.fold
    async def count(event: ReplayedEvent, tx: ProjectionTx) -> None:
        await tx.conn.execute(
            f"""INSERT INTO {tx.table} (session_id, kafka_partition, events, last_type)
                VALUES ($1, $2, 1, $3) ON CONFLICT (session_id) DO UPDATE
                SET events = {tx.table}.events + 1, kafka_partition = excluded.kafka_partition,
                    last_type = excluded.last_type, updated_at = now()""",
            event.envelope.session_id,
            event.partition,
            event.envelope.type,
        )

    async def snapshot_due(pool: asyncpg.Pool, table: str, partitions: Sequence[int]) -> None:
        """Snapshot the sessions of these partitions (this runner's) that are due."""
        due = await pool.fetch(
            f"""SELECT session_id, events FROM {table} WHERE events - snapshot_events >= $1
                AND kafka_partition = ANY($2::int[]) ORDER BY events DESC LIMIT 20""",
            s.snapshot_every,
            list(partitions),
        )
        for r in due:
            await take_snapshot(s, pool, r["session_id"], folds, registry)
            await pool.execute(
                f"UPDATE {table} SET snapshot_events = $2 WHERE session_id = $1",
                r["session_id"],
                r["events"],
            )

    p.after_commit = snapshot_due
    return p


async def forget(conn: asyncpg.Connection, topic: str) -> int:
    """Delete the topic's snapshots (after the agents' projection code changed)."""
    done = await conn.execute("DELETE FROM mesh_session_snapshots WHERE topic = $1", topic)
    return int(done.split()[-1])
