"""Session status from Postgres: what `mesh sessions`, `mesh session`, `mesh approve` and a
deadline sweep read. Built on mesh_actions (kept for good), not on the outbox (pruned).

A session is *ended* once a handler returned `ended(...)`, *waiting* while a handler's
`waiting(...)` step has no action by the same agent under the step's decision key
(`decision:<session>:<step>`; a refused decision is recorded under a key of its own), and
*running* otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

_WAITING_SQL = """
SELECT a.id, a.session_id, a.agent, a.result->'waiting' AS waiting, a.created_at
FROM mesh_actions a
WHERE a.result ? 'waiting'
  AND ($1::text IS NULL OR a.session_id = $1)
  AND ($2::float8 IS NULL OR (a.result->'waiting'->>'deadline')::float8 < $2)
  AND NOT EXISTS (
      SELECT 1 FROM mesh_actions d
      WHERE d.agent = a.agent
        AND d.idempotency_key
            = 'decision:' || a.session_id || ':' || (a.result->'waiting'->>'step'))
ORDER BY a.id
LIMIT $3
"""


@dataclass(kw_only=True)
class WaitingStep:
    session_id: str
    agent: str
    step: str
    decision_type: str
    deadline: float
    context: dict[str, Any]
    since: Any


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def waiting_steps(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    session_id: str | None = None,
    deadline_before: float | None = None,
    limit: int = 1000,
) -> list[WaitingStep]:
    rows = await conn.fetch(_WAITING_SQL, session_id, deadline_before, limit)
    steps = []
    for r in rows:
        w = _json(r["waiting"])
        steps.append(
            WaitingStep(
                session_id=r["session_id"],
                agent=r["agent"],
                step=w["step"],
                decision_type=w["decision_type"],
                deadline=float(w["deadline"]),
                context=w.get("context") or {},
                since=r["created_at"],
            )
        )
    return steps


_SESSIONS_SQL = """
WITH recent AS (
    SELECT session_id, min(created_at) AS started, max(created_at) AS last_at, max(id) AS last_id,
           count(*) AS actions
    FROM mesh_actions
    WHERE ($1::text IS NULL OR session_id = $1)
    GROUP BY session_id
    ORDER BY max(id) DESC
    LIMIT $2
)
SELECT r.session_id, r.started, r.last_at, r.actions,
       l.agent AS last_agent, l.input_type AS last_input,
       (SELECT e.result->'session_end' FROM mesh_actions e
         WHERE e.session_id = r.session_id AND e.result ? 'session_end'
         ORDER BY e.id LIMIT 1) AS session_end
FROM recent r JOIN mesh_actions l ON l.id = r.last_id
ORDER BY r.last_id DESC
"""


async def sessions(
    conn: asyncpg.Connection, *, session_id: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Recent sessions, newest activity first: status, current step, age."""
    rows = await conn.fetch(_SESSIONS_SQL, session_id, limit)
    waiting = {
        w.session_id: w
        for w in await waiting_steps(conn, session_id=session_id)
        if session_id or any(r["session_id"] == w.session_id for r in rows)
    }
    out = []
    for r in rows:
        end = _json(r["session_end"])
        w = waiting.get(r["session_id"])
        if end:
            status, step = "ended", end["outcome"]
        elif w:
            status, step = "waiting", f"{w.agent}: {w.step}"
        else:
            status, step = "running", f"{r['last_agent']} handled {r['last_input']}"
        out.append(
            {
                "session_id": r["session_id"],
                "status": status,
                "outcome": end["outcome"] if end else None,
                "reason": end.get("reason", "") if end else "",
                "step": step,
                "deadline": w.deadline if w else None,
                "started": r["started"],
                "last_activity": r["last_at"],
                "actions": r["actions"],
            }
        )
    return out
