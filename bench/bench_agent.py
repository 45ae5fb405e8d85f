"""The benchmark's own event types and agent (kept apart so `mesh agent run -m bench_agent`
can load them in a subprocess, with `bench/` on PYTHONPATH).

`bench-agent` consumes `bench.in` from `bench:in` and hands one `bench.out` per input to
`bench:out`: the smallest handler that still exercises the whole unit of work.
"""

from __future__ import annotations

from pydantic import BaseModel

from agentmesh.agents import Agent, Context
from agentmesh.schemas import registry

IN_TYPE = "bench.in"
OUT_TYPE = "bench.out"
IN_STREAM = "bench:in"
OUT_STREAM = "bench:out"
AGENT_NAME = "bench-agent"


class BenchIn(BaseModel):
    n: int
    text: str = ""


class BenchOut(BaseModel):
    n: int


registry.register(IN_TYPE, BenchIn, stream=IN_STREAM)
registry.register(OUT_TYPE, BenchOut, stream=OUT_STREAM)

bench_agent = Agent(AGENT_NAME, emits=[OUT_TYPE])


@bench_agent.handler(IN_TYPE)
async def handle(msg: BenchIn, ctx: Context) -> None:
    ctx.emit(OUT_TYPE, BenchOut(n=msg.n))
