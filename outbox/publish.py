"""Publishing a session's first event: outbox row first, then the Redis stream.

An event that enters the mesh from outside (`mesh publish`, an API, the demo) is written to
the outbox like every handoff, so the audit log in Kafka starts at the session's real first
event, and `mesh outbox redrive` can re-send it if Redis loses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from agentmesh.bus.entry import Outgoing
from agentmesh.bus.streams import Streams
from agentmesh.outbox import outbox_rows
from agentmesh.schemas.envelope import Envelope


async def publish_events(
    pool: asyncpg.Pool | asyncpg.Connection,
    bus: Streams,
    events: Sequence[tuple[str, Envelope]],
) -> list[str | None]:
    """Record (stream, envelope) pairs in the outbox, then XADD them (deduplicated by event id).
    Returns the new entry ids (None: that event id was already on its stream)."""
    if not events:
        return []
    rows = outbox_rows.OutboxRows()
    for stream, env in events:
        rows.add(stream, env)
    await outbox_rows.insert(pool, rows, skip_existing=True)
    return await bus.publish([Outgoing(s, e.event_id, e.to_wire()) for s, e in events])
