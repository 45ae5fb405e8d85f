"""Re-sending what the outbox still holds, after a downstream system lost it.

- `republish`: rows already published to Kafka go again (the broker or the topic was lost).
  The rows are marked unpublished and the relay path sends them, so they keep their order
  and their slot's single owner; readers dedup by event id.
- `redrive`: handoff rows go onto their Redis streams again (Redis lost its last second of
  writes). The deduplicating XADD skips events still on their stream; agents dedup what gets
  through by idempotency key.

Both only reach rows still in the outbox: published rows are pruned after
`MESH_OUTBOX_RETENTION_S`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from agentmesh import connect
from agentmesh.bus.entry import Outgoing
from agentmesh.bus.streams import Streams
from agentmesh.outbox.operator import NO_SESSION, record_operator_action
from agentmesh.outbox.relay import Relay
from agentmesh.settings import Settings

Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which outbox rows: one session's, or every row created since a time."""

    session_id: str | None = None
    since: datetime | None = None

    def __post_init__(self) -> None:
        if (self.session_id is None) == (self.since is None):
            raise ValueError("choose exactly one of --session or --since")

    def where(self, first_param: int) -> tuple[str, list[Any]]:
        if self.session_id is not None:
            return f"session_id = ${first_param}", [self.session_id]
        return f"created_at >= ${first_param}", [self.since]


@dataclass
class ResendResult:
    matched: int = 0  # outbox rows the selection found
    sent: int = 0  # delivered now (acked by Kafka / added to a stream)
    skipped: int = 0  # redrive: already on its stream
    remaining: int = 0  # republish: still waiting for a relay when the wait ended


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who asked for a re-send and why: recorded in the audit log like any operator action."""

    operator: str
    reason: str = ""


async def _record(
    conn: asyncpg.Connection, actor: Actor | None, action: str, sel: Selection
) -> None:
    if actor is None:
        return
    await record_operator_action(
        conn,
        operator=actor.operator,
        action=action,
        reason=actor.reason,
        target=f"session {sel.session_id}" if sel.session_id else f"since {sel.since}",
        session_id=sel.session_id or NO_SESSION,
        detail={"session_id": sel.session_id, "since": str(sel.since) if sel.since else None},
    )


async def republish(
    s: Settings,
    sel: Selection,
    *,
    wait_s: float = 120.0,
    progress: Progress | None = None,
    actor: Actor | None = None,
) -> ResendResult:
    """Mark the selected published rows unpublished, then relay them (this process takes every
    free slot; slots of running relays are theirs to send). Waits up to `wait_s`."""
    cond, args = sel.where(1)
    conn = await connect.pg_connect(s)
    try:
        async with conn.transaction():
            ids: list[int] = [
                r["id"]
                for r in await conn.fetch(
                    f"""UPDATE mesh_outbox SET published_at = NULL
                        WHERE published_at IS NOT NULL AND {cond} RETURNING id""",
                    *args,
                )
            ]
            await _record(conn, actor, "outbox.republish", sel)
        await conn.execute("NOTIFY mesh_outbox")
    finally:
        await conn.close()
    res = ResendResult(matched=len(ids))
    if not ids or wait_s <= 0:
        res.remaining = len(ids)
        return res

    relay = Relay(s, drain=True, member=False, name="republish")
    await relay.start()
    deadline = time.monotonic() + wait_s

    async def done() -> bool:
        assert relay.pool is not None
        left = await relay.pool.fetchval(
            "SELECT count(*) FROM mesh_outbox WHERE id = ANY($1) AND published_at IS NULL", ids
        )
        res.remaining = int(left)
        res.sent = len(ids) - res.remaining
        if progress is not None:
            progress(res.sent, len(ids))
        return res.remaining == 0 or time.monotonic() > deadline

    try:
        await relay.drain_until(done)
    finally:
        await relay.close()
    return res


async def redrive(
    s: Settings,
    sel: Selection,
    *,
    chunk: int = 500,
    progress: Progress | None = None,
    actor: Actor | None = None,
) -> ResendResult:
    """XADD the selected handoff rows onto their streams again, in outbox order."""
    cond, args = sel.where(1)
    conn = await connect.pg_connect(s)
    redis = connect.redis_client(s)
    res = ResendResult()
    try:
        await _record(conn, actor, "outbox.redrive", sel)
        rows = await conn.fetch(
            f"""SELECT stream, event_id::text AS event_id, envelope FROM mesh_outbox
                WHERE stream IS NOT NULL AND {cond} ORDER BY id""",
            *args,
        )
        res.matched = len(rows)
        bus = Streams(redis, group="-", consumer="-", dedup_ttl_s=s.dedup_ttl_s)
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            ids = await bus.publish(
                [Outgoing(r["stream"], r["event_id"], r["envelope"].encode()) for r in part]
            )
            res.sent += sum(1 for x in ids if x)
            res.skipped += sum(1 for x in ids if not x)
            if progress is not None:
                progress(i + len(part), len(rows))
            await asyncio.sleep(0)
    finally:
        await conn.close()
        await redis.aclose()
    return res
