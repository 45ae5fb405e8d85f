"""Session state as an operator sees it: status, current step, ages (from mesh_actions)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from agentmesh.client.errors import InvalidRequest
from agentmesh.outbox.sessions import sessions

STATUSES = ("running", "waiting", "ended")


@dataclass(frozen=True, kw_only=True)
class SessionState:
    session_id: str
    status: str  # running, waiting or ended
    outcome: str | None  # how it ended
    reason: str
    step: str  # where it stands: the outcome, the waiting step, or the last handler
    deadline: float | None  # epoch seconds, while waiting on a human
    started: datetime
    last_activity: datetime
    actions: int


async def session_states(
    pool: asyncpg.Pool,
    *,
    session_id: str | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[SessionState]:
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"unknown status {status!r}; choose from {', '.join(STATUSES)}")
    async with pool.acquire() as conn:
        rows = await sessions(
            conn, session_id=session_id, limit=limit if status is None else 10_000
        )
    found = [SessionState(**r) for r in rows]
    if status is not None:
        found = [s for s in found if s.status == status][:limit]
    return found
