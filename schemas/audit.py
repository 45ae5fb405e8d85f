"""Audit events the runtime itself writes: one `mesh.action` per handled input.

They go to the outbox (and so to Kafka) next to the handoffs, never onto a Redis stream, so a
session replayed from Kafka shows what every agent did, not only what it passed on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from agentmesh.schemas.registry import registry

ACTION = "mesh.action"


class ActionRecorded(BaseModel):
    agent: str
    input_event_id: str
    input_type: str
    result: Any = None
    emitted: list[str] = []


registry.register(ACTION, ActionRecorded, stream=None)


OPERATOR = "mesh.operator"


class OperatorAction(BaseModel):
    """A human's hand on the mesh (a DLQ retry, drop or edit): who, what, on what, and why."""

    operator: str
    action: str  # dlq.retry, dlq.drop, dlq.edit
    reason: str
    target: str  # e.g. the DLQ entry id
    event_id: str | None = None  # the dead-lettered event, when its envelope could be read
    stream: str | None = None
    detail: dict[str, Any] = {}


registry.register(OPERATOR, OperatorAction, stream=None)
