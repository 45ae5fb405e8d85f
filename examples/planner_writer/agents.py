"""Two small agents that hand work to each other across processes: a task goes to the
planner, whose plan goes to the writer, whose draft ends the session.

No LLM is called: `fake_llm` stands in for one (deterministic, a little latency) so the
example runs anywhere. Swap it for a real client; the breaker and retries stay the same.
"""

from __future__ import annotations

import asyncio
import hashlib

from pydantic import BaseModel, Field

from agentmesh import Agent, Context, DependencySpec, registry


class TaskSubmitted(BaseModel):
    goal: str = Field(min_length=1, max_length=2000)
    audience: str = "engineers"


class PlanReady(BaseModel):
    goal: str
    steps: list[str]


class DraftReady(BaseModel):
    goal: str
    text: str
    words: int


registry.register("task.submitted", TaskSubmitted, stream="mesh:tasks")
registry.register("plan.ready", PlanReady, stream="mesh:plans")
registry.register("draft.ready", DraftReady, stream="mesh:drafts")


async def fake_llm(prompt: str) -> str:
    """Stands in for a model call: deterministic text after a short wait."""
    await asyncio.sleep(0.01)
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return f"[{digest}] {prompt}"


planner = Agent(
    "planner", emits=["plan.ready"], dependencies=[DependencySpec(name="llm", fail_max=5)]
)
writer = Agent(
    "writer", emits=["draft.ready"], dependencies=[DependencySpec(name="llm", fail_max=5)]
)


@planner.handler("task.submitted", needs=["llm"])
async def plan(task: TaskSubmitted, ctx: Context) -> dict[str, object]:
    steps = [
        await ctx.call("llm", fake_llm, f"step {i} of '{task.goal}' for {task.audience}")
        for i in (1, 2, 3)
    ]
    ctx.emit("plan.ready", PlanReady(goal=task.goal, steps=steps))
    return {"steps": len(steps)}


@writer.handler("plan.ready", needs=["llm"])
async def write(plan: PlanReady, ctx: Context) -> dict[str, object]:
    text = await ctx.call("llm", fake_llm, " then ".join(plan.steps))
    ctx.emit("draft.ready", DraftReady(goal=plan.goal, text=text, words=len(text.split())))
    return {"words": len(text.split())}


# How each event changes the session's state, for `mesh replay SESSION --state`.
@planner.projection("task.submitted")
def _submitted(state: dict[str, object], task: TaskSubmitted, env: object) -> None:
    state.update(goal=task.goal, audience=task.audience, status="submitted")


@planner.projection("plan.ready")
def _planned(state: dict[str, object], plan: PlanReady, env: object) -> None:
    state.update(status="planned", steps=len(plan.steps))


@writer.projection("draft.ready")
def _drafted(state: dict[str, object], draft: DraftReady, env: object) -> None:
    state.update(status="drafted", words=draft.words)
