"""Operator actions go to the audit log like agent actions: an outbox row with no stream.

The row commits *before* the action is carried out, so the log never misses an action that
happened; if the command dies in between, the log shows an attempt the operator can see and
repeat (a retry or a drop of an entry that is already gone is refused, not done twice).
"""

from __future__ import annotations

import getpass
import os
from typing import Any

import asyncpg

from agentmesh.outbox import outbox_rows
from agentmesh.schemas.audit import OPERATOR
from agentmesh.schemas.envelope import Envelope
from agentmesh.schemas.registry import registry

NO_SESSION = "operator"  # where an action on an unreadable envelope or many sessions is filed


def current_operator() -> str:
    """Who is acting: MESH_OPERATOR if set (a CI job, a shared bastion), else the login."""
    return os.environ.get("MESH_OPERATOR") or getpass.getuser()


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
    return env
