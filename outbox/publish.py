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
from agentmesh.outbox.kafka import session_hash
from agentmesh.schemas.envelope import Envelope

_INSERT_SQL = """
INSERT INTO mesh_outbox (event_id, session_id, type, stream, envelope, agent, idempotency_key,
                         causation_id, schema_version, session_hash)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::int[], $10::int[])
ON CONFLICT (event_id) DO NOTHING
"""


async def publish_events(
    pool: asyncpg.Pool | asyncpg.Connection,
    bus: Streams,
    events: Sequence[tuple[str, Envelope]],
) -> list[str | None]:
    """Record (stream, envelope) pairs in the outbox, then XADD them (deduplicated by event id).
    Returns the new entry ids (None: that event id was already on its stream)."""
    if not events:
        return []
    cols: list[list[object]] = [[] for _ in range(10)]
    for stream, env in events:
        values = (
            env.event_id,
            env.session_id,
            env.type,
            stream,
            env.to_json(),
            env.source,
            env.idempotency_key,
            env.causation_id,
            env.schema_version,
            session_hash(env.session_id),
        )
        for col, val in zip(cols, values, strict=True):
            col.append(val)
    await pool.execute(_INSERT_SQL, *cols)
    return await bus.publish([Outgoing(s, e.event_id, e.to_wire()) for s, e in events])
