"""Approve or reject the step a session waits on, and find out which decision won.

A decision is published like any event that enters the mesh (outbox row, then the
deduplicated XADD) under the step's shared idempotency key, after a `mesh.operator` row that
says who decided and why. Two decisions can race (another operator's, the deadline sweep's):
the agent acts on the first and skips the rest, and `DecisionOutcome.won` says whether it was ours.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentmesh.agents.decisions import REFUSED_PREFIX
from agentmesh.client.errors import Conflict, InvalidRequest, NotFound
from agentmesh.outbox.operator import record_operator_action
from agentmesh.outbox.publish import publish_events
from agentmesh.outbox.sessions import waiting_steps
from agentmesh.schemas import registry
from agentmesh.schemas.approval import decision_key

if TYPE_CHECKING:
    from agentmesh.client.mesh import Mesh

#: How long a decision waits to see the agent act on it (or on a rival decision).
DECISION_WAIT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class ActedOn:
    """The decision the waiting agent acted on; event_id None: not acted on yet."""

    event_id: str | None
    decision: str
    operator: str


@dataclass(frozen=True, kw_only=True)
class DecisionOutcome:
    session_id: str
    decision: str  # approve or reject
    operator: str
    step: str
    agent: str
    event_id: str  # our decision event
    reason: str
    acted_on: ActedOn

    @property
    def won(self) -> bool:
        """False when another decision on this step was acted on first."""
        return self.acted_on.event_id in (None, self.event_id)


async def decide(mesh: Mesh, session_id: str, decision: str, reason: str) -> DecisionOutcome:
    if decision not in ("approve", "reject"):
        raise InvalidRequest(f"decision must be approve or reject, not {decision!r}")
    if decision == "reject" and not reason.strip():
        raise InvalidRequest("a rejection needs a reason")
    pool = await mesh.pg()
    steps = await waiting_steps(pool, session_id=session_id)
    if not steps:
        raise NotFound(f"session {session_id!r} is not waiting for a decision")
    w = steps[-1]
    key = decision_key(session_id, w.step)
    env = registry.make(
        w.decision_type,
        {
            "decision": decision,
            "operator": mesh.operator,
            "reason": reason,
            "step": w.step,  # no context: the agent acts on the step it stored, not on ours
        },
        session_id=session_id,
        idempotency_key=key,
        source=f"operator:{mesh.operator}",
    )
    stream = registry.stream_of(w.decision_type)
    if not stream:
        raise InvalidRequest(f"decision type {w.decision_type} has no stream")
    await record_operator_action(
        pool,
        operator=mesh.operator,
        action=decision,
        reason=reason,
        target=f"{w.agent}:{w.step}",
        session_id=session_id,
        event_id=env.event_id,
        stream=stream,
    )
    await publish_events(pool, mesh.streams, [(stream, env)])
    mine = ActedOn(event_id=None, decision=decision, operator=mesh.operator)
    acted = await _acted_on(mesh, w.agent, key, env.event_id, mine)
    return DecisionOutcome(session_id=session_id, decision=decision, operator=mesh.operator,
                    step=w.step, agent=w.agent, event_id=env.event_id, reason=reason,
                    acted_on=acted)  # fmt: skip


async def _acted_on(mesh: Mesh, agent: str, key: str, event_id: str, mine: ActedOn) -> ActedOn:
    """Which decision the agent acted on, waiting up to DECISION_WAIT_S for it to act."""
    pool = await mesh.pg()
    deadline = time.monotonic() + DECISION_WAIT_S
    while True:
        acted = await pool.fetchval(
            "SELECT input_event_id::text FROM mesh_actions "
            "WHERE agent = $1 AND idempotency_key = $2",
            agent,
            key,
        )
        if acted or time.monotonic() > deadline:
            break
        refused = await pool.fetchval(  # the agent checked ours and said no (agents/decisions.py)
            "SELECT result->>'refused' FROM mesh_actions WHERE agent = $1 AND idempotency_key = $2",
            agent,
            f"{REFUSED_PREFIX}{event_id}",
        )
        if refused:
            raise Conflict(f"{agent} refused this decision: {refused}")
        await asyncio.sleep(0.1)
    if acted is None:
        return mine
    if acted == event_id:
        return ActedOn(event_id=acted, decision=mine.decision, operator=mine.operator)
    raw = await pool.fetchval("SELECT envelope FROM mesh_outbox WHERE event_id = $1", acted)
    payload = json.loads(raw)["payload"] if raw else {}
    return ActedOn(event_id=acted, decision=str(payload.get("decision", "?")),
                   operator=str(payload.get("operator", "?")))  # fmt: skip
