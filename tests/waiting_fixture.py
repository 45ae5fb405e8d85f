"""A minimal agent with a step that waits on a human, outside the refund desk: what the
framework guarantees for every `waiting(...)` step (tests/test_forged_decisions.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from agentmesh import Agent, Context, Decision, registry, waiting


class Knock(BaseModel):
    amount: int


class DoorDecided(Decision):
    pass


registry.register("door.knocked", Knock, stream="t:knock")
registry.register("door.decided", DoorDecided, stream="t:door-decisions")

gate = Agent("gatekeeper")


@gate.handler("door.knocked")
async def knocked(k: Knock, ctx: Context) -> dict[str, Any]:
    return waiting(step="open", decision_type="door.decided", deadline=4e9,
                   context={"amount": k.amount})  # fmt: skip


@gate.handler("door.decided")
async def decided(d: DoorDecided, ctx: Context) -> dict[str, Any]:
    stored = ctx.step.context if ctx.step else None
    return {"decision": d.decision, "stored": stored, "context_seen": d.context}
