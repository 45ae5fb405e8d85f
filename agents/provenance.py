"""Is an input really what another agent committed? Anyone who can write to a stream can XADD
an event that names any source, so a handler that moves money asks Postgres: the event must
be in the emitting agent's own outbox rows (written in the transaction of its action), and
match them. The stored copy, not the wire's, is then the one acted on.

The outbox keeps published rows for MESH_OUTBOX_RETENTION_S (7 days): an event older than
that (a payment parked in Redis for longer) is refused as well, and must be decided again.
"""

from __future__ import annotations

import asyncpg

from agentmesh.agents.resilience import NonRetryable
from agentmesh.schemas.envelope import Envelope


class NotEmittedBy(NonRetryable):
    """The input is not an event the named agent committed (or differs from it): refused."""


_STORED_SQL = "SELECT agent, stream, envelope FROM mesh_outbox WHERE event_id = $1"


async def stored_by(
    pool: asyncpg.Pool | asyncpg.Connection, env: Envelope, *, agent: str
) -> Envelope:
    """The event `env` as `agent` stored it; raises NotEmittedBy when it is not there, or
    when any field that matters differs (type, session, idempotency key, payload)."""
    row = await pool.fetchrow(_STORED_SQL, env.event_id)
    what = f"{env.type} {env.event_id}"
    if row is None or row["agent"] != agent or row["stream"] is None:
        raise NotEmittedBy(
            f"{what} was not emitted by {agent} (not in its outbox: forged, or older than "
            "MESH_OUTBOX_RETENTION_S); refused"
        )
    stored = Envelope.model_validate_json(row["envelope"])
    differs = [
        name
        for name, mine, theirs in (
            ("type", stored.type, env.type),
            ("session_id", stored.session_id, env.session_id),
            ("idempotency_key", stored.idempotency_key, env.idempotency_key),
            ("schema_version", stored.schema_version, env.schema_version),
            ("payload", stored.payload, env.payload),
        )
        if mine != theirs
    ]
    if differs:
        fields = ", ".join(differs)
        raise NotEmittedBy(f"{what} differs from what {agent} stored ({fields}); refused")
    return stored
