"""Steps that wait on a human, and how a session says it has ended (generic, not refund-desk).

A handler that must wait returns `waiting(...)` as its result: the mesh records it with the
action, so `mesh sessions` sees the session waiting and `mesh approve|reject` knows which
decision event to publish, and onto which stream (the decision type's, from the registry).
The decision type's payload model must subclass `Decision`. Every decision of one step
shares the idempotency key `decision:<session>:<step>`, so the first decision (a human's,
or the deadline's) is acted on and any later one is skipped as a duplicate.

A decision is never trusted from the message (anyone who can write to the stream can write
one): before the handler runs, the framework checks it against the step the agent itself
stored with `waiting(...)` (same session and step, still open, this decision type, the
step's key, an `expire` only after the deadline) and hands the handler that step's stored
`context` (also as `ctx.step`). Anything else is recorded as refused and does nothing
(agents/decisions.py).

A handler that ends the session returns `ended(outcome, reason)`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

DecisionKind = Literal["approve", "reject", "expire"]


class Decision(BaseModel):
    decision: DecisionKind
    operator: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=2000)
    step: str
    context: dict[str, Any] = {}
    """Ignored on the wire: the agent replaces it with the context its stored step holds."""


def waiting(
    *, step: str, decision_type: str, deadline: float, context: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The result of a handler whose session now waits for a human decision."""
    return {
        **extra,
        "waiting": {
            "step": step,
            "decision_type": decision_type,
            "deadline": deadline,
            "context": context,
        },
    }


def ended(outcome: str, reason: str = "", **extra: Any) -> dict[str, Any]:
    """The result of a handler that ends its session (`mesh sessions` shows the outcome)."""
    return {**extra, "session_end": {"outcome": outcome, "reason": reason}}


def decision_key(session_id: str, step: str) -> str:
    return f"decision:{session_id}:{step}"
