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


# A chain of four trivial agents for the latency benchmark (bench/latency.py): chain-i
# consumes `chain.i` from `bench:chain:i` and hands `chain.{i+1}` on; chain-4 ends it with
# `chain.done` on `bench:chain:done`, which the driver reads.
CHAIN_HOPS = 4
CHAIN_DONE_STREAM = "bench:chain:done"


class ChainStep(BaseModel):
    n: int


def chain_stream(i: int) -> str:
    return CHAIN_DONE_STREAM if i > CHAIN_HOPS else f"bench:chain:{i}"


def chain_type(i: int) -> str:
    return "chain.done" if i > CHAIN_HOPS else f"chain.{i}"


def _chain_agent(i: int) -> Agent:
    agent = Agent(f"chain-{i}", emits=[chain_type(i + 1)])
    nxt = chain_type(i + 1)

    @agent.handler(chain_type(i))
    async def step(msg: ChainStep, ctx: Context) -> None:
        ctx.emit(nxt, ChainStep(n=msg.n))

    return agent


for _i in range(1, CHAIN_HOPS + 2):
    registry.register(chain_type(_i), ChainStep, stream=chain_stream(_i))
chain_agents = [_chain_agent(i) for i in range(1, CHAIN_HOPS + 1)]
