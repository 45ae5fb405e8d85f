"""Agents the integration tests run as real processes (`mesh agent run -m tests.mesh_fixture`).

Their handlers leave traces in Redis (`t:runs:<key>` counters) so tests can tell how often a
handler ran, which may be more than once, from how often its effect happened, which must be once.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel, field_validator
from redis.asyncio import BlockingConnectionPool, Redis

from agentmesh.agents import Agent, Context, DependencySpec, NonRetryable, RetryPolicy
from agentmesh.schemas import registry


class Job(BaseModel):
    n: int
    sleep_ms: int = 0
    fail: str | None = None  # "always" | "nonretryable" | "crash" | "in_validator"

    @field_validator("fail")
    @classmethod
    def _buggy_validator(cls, fail: str | None) -> str | None:
        if fail == "in_validator":  # a model with a bug: raises, but no ValidationError
            raise ZeroDivisionError("division by zero")
        return fail


class JobDone(BaseModel):
    n: int


class DepCall(BaseModel):
    n: int


registry.register("job.created", Job, stream="t:jobs")
registry.register("job.done", JobDone, stream="t:done")
registry.register("job.final", JobDone, stream="t:final")
registry.register("dep.call", DepCall, stream="t:dep")
registry.register("dep.done", DepCall, stream="t:dep-done")

_redis: Redis | None = None


def redis() -> Redis:
    global _redis
    if _redis is None:
        # a blocking pool: 200 handlers at once wait for a connection instead of failing
        pool = BlockingConnectionPool.from_url(
            os.environ["MESH_REDIS_URL"],
            max_connections=50,
            timeout=5,
            socket_timeout=5,  # a reply lost with a killed server fails the call, not hangs it
            socket_connect_timeout=5,
        )
        _redis = Redis(connection_pool=pool)
    return _redis


worker = Agent("worker", emits=["job.done"])
finisher = Agent("finisher", emits=["job.final"])
caller = Agent(
    "caller",
    emits=["dep.done"],
    dependencies=[
        DependencySpec(name="flaky", fail_max=2, reset_timeout_s=1.5, retry=RetryPolicy(attempts=1))
    ],
)


@worker.handler("job.created")
async def do_job(job: Job, ctx: Context) -> dict[str, int]:
    await redis().incr(f"t:runs:{ctx.envelope.event_id}")
    await redis().incr("t:started")
    if job.sleep_ms:
        await asyncio.sleep(job.sleep_ms / 1000)
    if job.fail == "crash":  # the process dies with it, like a segfault or an OOM kill
        os._exit(1)
    if job.fail == "always":
        raise RuntimeError(f"job {job.n} always fails")
    if job.fail == "nonretryable":
        raise NonRetryable(f"job {job.n} can never succeed")
    ctx.emit("job.done", JobDone(n=job.n))
    return {"n": job.n}


@finisher.handler("job.done")
async def finish(done: JobDone, ctx: Context) -> dict[str, int]:
    ctx.emit("job.final", JobDone(n=done.n))
    return {"n": done.n}


async def _flaky_dependency(n: int) -> int:
    await redis().incr("t:dep-attempts")
    if await redis().exists("t:flaky-down"):
        raise ConnectionError("flaky dependency is down")
    return n


@caller.handler("dep.call", needs=["flaky"])
async def call_dep(msg: DepCall, ctx: Context) -> dict[str, int]:
    value = await ctx.call("flaky", _flaky_dependency, msg.n)
    ctx.emit("dep.done", DepCall(n=value))
    return {"n": value}


@worker.projection("job.created")
def _created(state: dict[str, object], job: Job, env: object) -> None:
    state.update(n=job.n, status="created")


@finisher.projection("job.final")
def _final(state: dict[str, object], final: JobDone, env: object) -> None:
    state.update(status="final")
