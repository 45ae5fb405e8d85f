"""Versioned schema migrations: `outbox/migrations/NNNN_name.sql`, applied in order, once each.

An advisory lock serialises concurrent `mesh db migrate` runs (several replicas starting at
once); each file runs in its own transaction together with its bookkeeping row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files

import asyncpg

from agentmesh import connect
from agentmesh.settings import Settings

_LOCK_ID = 0x6D657368  # "mesh"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    out = []
    for item in files("agentmesh.outbox").joinpath("migrations").iterdir():
        m = _NAME.match(item.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), item.read_text()))
    return sorted(out, key=lambda mig: mig.version)


async def applied(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('mesh_schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM mesh_schema_migrations")}


async def migrate(dsn: str | Settings) -> list[Migration]:
    """Apply pending migrations; returns the ones applied now (empty when up to date)."""
    conn = await (connect.pg_connect(dsn) if isinstance(dsn, Settings) else asyncpg.connect(dsn))
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS mesh_schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = await applied(conn)
            new = [m for m in available() if m.version not in done]
            for mig in new:
                async with conn.transaction():
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "INSERT INTO mesh_schema_migrations(version, name) VALUES ($1, $2)",
                        mig.version,
                        mig.name,
                    )
            return new
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
