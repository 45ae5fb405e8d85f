"""Operator actions go to the audit log like agent actions: an outbox row with no stream.

The row commits *before* the action is carried out, so the log never misses an action that
happened; if the command dies in between, the log shows an attempt the operator can see and
repeat (a retry or a drop of an entry that is already gone is refused, not done twice).

Who acted is not the caller's to say. The database stamps every `mesh.operator` row with the
role the connection logged in as (`session_user`, migration 0007), and refuses the row when
that role may not take the action (approve, DLQ, repair: see docs/access-control.md). The
`operator` a caller passes is only what it believes it is (a relay's name, a job's): when it
differs from the role it is kept as `detail.claimed_by`.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from agentmesh.outbox import outbox_rows
from agentmesh.schemas.audit import OPERATOR
from agentmesh.schemas.envelope import Envelope
from agentmesh.schemas.registry import registry

NO_SESSION = "operator"  # where an action on an unreadable envelope or many sessions is filed


async def session_role(conn: asyncpg.Connection | asyncpg.Pool) -> str:
    """The role this connection logged in as: the identity its operator actions are recorded
    under (SET ROLE does not change it)."""
    return str(await conn.fetchval("SELECT session_user"))


async def require_right(conn: asyncpg.Connection | asyncpg.Pool, action: str) -> None:
    """Raise asyncpg.InsufficientPrivilegeError, naming the group role the action needs, when
    this connection's role may not take it. The trigger of migration 0007 enforces the same
    rule on the insert; asking first turns a bare "permission denied for table" (a read-only
    role has no INSERT at all) into a message that says which right is missing."""
    row = await conn.fetchrow(
        "SELECT session_user AS who, mesh_operator_right($1) AS grp, "
        "mesh_session_may(mesh_operator_right($1)) AS may",
        action,
    )
    if row is not None and not row["may"]:
        raise asyncpg.InsufficientPrivilegeError(
            f'role "{row["who"]}" may not {action}: it needs membership in '
            f"{row['grp'] or 'an operator role'} (docs/access-control.md)"
        )


async def record_operator_action(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    operator: str,
    action: str,
    reason: str,
    target: str,
    session_id: str | None,
    event_id: str | None = None,
    stream: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Envelope:
    """Write the action's audit row; returns the envelope as the database stored it (with
    the operator it recorded). Raises asyncpg.InsufficientPrivilegeError when the
    connection's role may not take `action`."""
    await require_right(conn, action)
    env = registry.make(
        OPERATOR,
        {
            "operator": operator,
            "action": action,
            "reason": reason,
            "target": target,
            "event_id": event_id,
            "stream": stream,
            "detail": detail or {},
        },
        session_id=session_id or NO_SESSION,
        source=f"operator:{operator}",
        causation_id=event_id,
    )
    row = outbox_rows.OutboxRows()
    row.add(None, env)  # no stream: the audit log only
    await outbox_rows.insert(conn, row, skip_existing=False)
    stored = await conn.fetchval(
        "SELECT envelope FROM mesh_outbox WHERE event_id = $1::uuid", env.event_id
    )
    return Envelope.model_validate_json(stored) if stored else env
