"""A first delivery skips the Postgres look-up of committed work only when the publish step's
dedup key shows the entry is its event's first copy on the stream (agents/consumer.py). What
that changes, and what it does not (README, "What can happen twice")."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
from redis.asyncio import Redis

from agentmesh.bus.streams import dedup_key
from tests.conftest import AgentProcess, eventually
from tests.helpers import actions, group_state, job, publish, stream_events

Start = Callable[..., AgentProcess]


async def _drained(redis: Redis) -> bool:
    st = await group_state(redis, "t:jobs", "worker")
    return bool(st) and st["pending"] == 0 and st["lag"] == 0


async def _runs(redis: Redis, event_id: str) -> int:
    return int(await redis.get(f"t:runs:{event_id}") or 0)


async def test_a_raw_copy_of_a_published_event_does_not_run_again(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    env = job(1)
    await publish(redis, [env])  # the first copy: its dedup key names its entry
    agents("worker")
    await eventually(lambda: _drained(redis), what="drained")
    await redis.xadd("t:jobs", {"envelope": env.to_wire()})  # a second copy, bypassing dedup
    await eventually(lambda: _drained(redis), what="drained again")
    assert await _runs(redis, env.event_id) == 1  # looked up, found committed, not re-run
    assert await actions(pg, "worker") == 1
    assert len(await stream_events(redis, "t:done")) == 1


async def test_a_copy_after_the_dedup_window_runs_again_and_records_once(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    env = job(2)
    await publish(redis, [env])
    agents("worker")
    await eventually(lambda: _drained(redis), what="drained")
    await redis.delete(dedup_key("t:jobs", env.event_id))  # the window ends (the key expires)
    await publish(redis, [env])  # a first copy again, as far as Redis can tell
    await eventually(lambda: _drained(redis), what="drained again")
    assert await _runs(redis, env.event_id) == 2  # the documented re-run
    assert await actions(pg, "worker") == 1  # its effect: once
    done = await stream_events(redis, "t:done")
    assert len(done) == 1 and done[0].causation_id == env.event_id  # stored handoff, deduped


async def test_a_handler_that_calls_the_outside_world_never_runs_again_for_a_copy(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    from agentmesh.schemas import registry

    env = registry.make("dep.call", {"n": 1}, session_id="s-dep")  # caller needs=["flaky"]
    await publish(redis, [env])
    agents("caller")
    st = lambda: group_state(redis, "t:dep", "caller")  # noqa: E731

    async def drained() -> bool:
        s = await st()
        return bool(s) and s["pending"] == 0 and s["lag"] == 0

    await eventually(drained, what="drained")
    await redis.delete(dedup_key("t:dep", env.event_id))
    await publish(redis, [env])  # a first copy again, as far as Redis can tell
    await eventually(drained, what="drained again")
    assert int(await redis.get("t:dep-attempts") or 0) == 1  # looked up: not called again
    assert await actions(pg, "caller") == 1
