"""A projection and a session fold for the projection and snapshot tests
(`--module tests.projection_fixture`): it also imports the test agents and event types."""

from __future__ import annotations

from typing import Any

import asyncpg

import tests.mesh_fixture  # noqa: F401  (the test agents and event types)
from agentmesh import Agent, Projection, ProjectionTx, ReplayedEvent
from agentmesh.schemas import Envelope

counts = Projection(
    "t_counts",
    table="""CREATE TABLE {table} (session_id text PRIMARY KEY, events bigint NOT NULL,
             sum_n bigint NOT NULL);
             CREATE INDEX {table}_sum ON {table} (sum_n)""",
    types=["job.done"],
    queries={"all": "SELECT session_id, events, sum_n FROM {table} ORDER BY session_id"},
)


@counts.fold
async def count(event: ReplayedEvent, tx: ProjectionTx) -> None:
    n = event.envelope.payload.get("n")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"job.done without a usable n: {n!r}")  # refused: skipped alone
    await tx.conn.execute(
        f"""INSERT INTO {tx.table} VALUES ($1, 1, $2) ON CONFLICT (session_id) DO UPDATE
            SET events = {tx.table}.events + 1, sum_n = {tx.table}.sum_n + excluded.sum_n""",
        event.envelope.session_id,
        n,
    )


tally = Agent("tally")


@tally.projection("job.done")
def _tally(state: dict[str, Any], done: Any, env: Envelope) -> None:
    """Order-sensitive on purpose: a fold in another order gives another digest."""
    n = int(env.payload["n"])
    state["count"] = int(state.get("count", 0)) + 1
    state["digest"] = (int(state.get("digest", 7)) * 31 + n) % 1_000_000_007
    state["last"] = n


async def reset(conn: asyncpg.Connection) -> None:
    """Forget every projection, its tables and the snapshots (each test has its own topic)."""
    for (name,) in await conn.fetch("SELECT name FROM mesh_projections"):
        await conn.execute(f"DROP VIEW IF EXISTS {name}")
    tables = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
        "AND (tablename LIKE 't\\_counts\\_g%' OR tablename LIKE 'mesh\\_sessions\\_g%')"
    )
    for (t,) in tables:
        await conn.execute(f"DROP TABLE {t} CASCADE")
    await conn.execute(
        "TRUNCATE mesh_projections, mesh_projection_offsets, mesh_projection_applied, "
        "mesh_projection_skipped, mesh_session_snapshots"
    )
