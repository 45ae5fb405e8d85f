"""A human decision is checked against the waiting step the agent itself stored, never trusted
from the message: anyone who can write to a stream can write a decision.

Before a handler of a `Decision` type runs, the framework loads the step this agent stored
with `waiting(...)` in this session (its own `mesh_actions` row) and requires that:

- the agent waits on that step in that session, for this decision type;
- the step is not decided yet (no action of this agent under the step's decision key);
- the decision carries the step's idempotency key (`decision:<session>:<step>`), so every
  decision of one step shares one key and at most one is ever acted on;
- an `expire` comes after the stored deadline.

A decision that passes reaches the handler with `context` replaced by the context the step
stored (whatever the message carried is dropped), and `ctx.step` set. One that fails does
not run the handler: it is recorded as an action whose result is `{"refused": why}` under a
key of its own (`refused:<event id>`), so a refused decision never uses up the step's key
and the real decision is still acted on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from agentmesh.schemas.approval import Decision, decision_key
from agentmesh.schemas.envelope import Envelope

if TYPE_CHECKING:
    from agentmesh.agents.context import Context

REFUSED_PREFIX = "refused:"

_STEP_SQL = """
SELECT a.result->'waiting' AS waiting,
       EXISTS (SELECT 1 FROM mesh_actions d
               WHERE d.agent = a.agent AND d.idempotency_key = $4) AS decided
FROM mesh_actions a
WHERE a.agent = $1 AND a.session_id = $2 AND a.result ? 'waiting'
  AND a.result->'waiting'->>'step' = $3
ORDER BY a.id DESC
LIMIT 1
"""


@dataclass(frozen=True, kw_only=True)
class StoredStep:
    """What the agent stored when it began to wait: the only source a decision is acted on."""

    session_id: str
    step: str
    decision_type: str
    deadline: float
    context: dict[str, Any]


class DecisionRefused(Exception):
    """The decision does not match a step this agent waits on; why, in one line."""


async def stored_step(
    pool: asyncpg.Pool | asyncpg.Connection, *, agent: str, env: Envelope, decision: Decision
) -> StoredStep:
    """The waiting step `decision` is for, as the agent stored it; raises DecisionRefused."""
    session, step = env.session_id, decision.step
    key = decision_key(session, step)
    row = await pool.fetchrow(_STEP_SQL, agent, session, step, key)
    if row is None:
        raise DecisionRefused(f"session {session!r} never waited on step {step!r} of {agent}")
    w = row["waiting"]
    w = json.loads(w) if isinstance(w, str) else w
    stored = StoredStep(
        session_id=session,
        step=step,
        decision_type=str(w.get("decision_type", "")),
        deadline=float(w.get("deadline") or 0.0),
        context=dict(w.get("context") or {}),
    )
    if row["decided"]:
        raise DecisionRefused(f"step {step!r} of session {session!r} is already decided")
    if stored.decision_type != env.type:
        raise DecisionRefused(f"step {step!r} waits for {stored.decision_type}, not {env.type}")
    if env.idempotency_key != key:
        raise DecisionRefused(
            f"a decision of step {step!r} must carry the idempotency key {key!r}, "
            f"not {env.idempotency_key!r}"
        )
    if decision.decision == "expire" and time.time() < stored.deadline:
        raise DecisionRefused(f"expire before the step's deadline ({stored.deadline:.0f})")
    return stored


def refused_key(env: Envelope) -> str:
    """The key a refused decision is recorded under: its own, never the step's."""
    return f"{REFUSED_PREFIX}{env.event_id}"


async def run_guarded(fn: Any, payload: Any, ctx: Context) -> Any:
    """Run a handler; a `Decision` first passes `stored_step` (else the handler does not run
    and the result says why it was refused)."""
    if not isinstance(payload, Decision):
        return await fn(payload, ctx)
    if ctx.pool is None:  # never acted on unchecked
        raise RuntimeError("a decision can only be checked with the agent's Postgres pool")
    try:
        step = await stored_step(ctx.pool, agent=ctx.agent, env=ctx.envelope, decision=payload)
    except DecisionRefused as exc:
        ctx.refused = str(exc)
        ctx.log.warning("decision refused", refused=str(exc), operator=payload.operator)
        return {"refused": str(exc), "decision": payload.decision, "step": payload.step,
                "operator": payload.operator}  # fmt: skip
    ctx.step = step
    return await fn(payload.model_copy(update={"context": step.context}), ctx)
