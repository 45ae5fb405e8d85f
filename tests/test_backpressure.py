"""Backpressure at the edge: publishing refuses (or waits for room) while a stream's backlog,
the lag plus pending of its slowest consumer group, is over MESH_PUBLISH_MAX_BACKLOG; a batch
is published whole or not at all; nothing is lost or written twice. Real Redis, Postgres
and agent processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

import tests.mesh_fixture  # noqa: F401  (registers the event types Mesh validates against)
from agentmesh import Mesh
from agentmesh.bus.backlog import backlogs
from agentmesh.client import Backpressure, MeshError, NewEvent
from tests.audit_helpers import settings_from
from tests.conftest import eventually
from tests.helpers import actions, mesh, stream_events


def _jobs(session: str, first: int, n: int) -> list[NewEvent]:
    return [
        NewEvent(event_type="job.created", payload={"n": i}, session_id=session)
        for i in range(first, first + n)
    ]


async def _outbox_rows(pg: asyncpg.Connection, session: str) -> int:
    """The session's published jobs in the outbox (not the worker's actions and handoffs)."""
    n = await pg.fetchval(
        "SELECT count(*) FROM mesh_outbox WHERE session_id = $1 AND type = 'job.created'", session
    )
    return int(n)


async def test_over_the_bound_nothing_is_published_and_a_batch_is_whole(
    base_env: dict[str, str], redis: Redis, pg: asyncpg.Connection
) -> None:
    async with Mesh(settings_from(base_env, publish_max_backlog=5)) as client:
        for i in range(5):  # nobody consumes t:jobs yet: its whole length is its backlog
            await client.publish("job.created", {"n": i}, session_id="bp")
        with pytest.raises(Backpressure) as refused:
            await client.publish("job.created", {"n": 5}, session_id="bp")
        assert isinstance(refused.value, MeshError) and refused.value.bound == 5
        assert refused.value.backlogs == {"t:jobs": 5}
        assert "t:jobs has 5" in str(refused.value) and "nothing was published" in str(
            refused.value
        )

        # a group read 2 entries and acked 1: backlog = lag 3 + pending 1 = 4, room for one
        await redis.xgroup_create("t:jobs", "worker", id="0")
        read = await redis.xreadgroup("worker", "c", {"t:jobs": ">"}, count=2)
        await redis.xack("t:jobs", "worker", read[0][1][0][0])
        assert await backlogs(redis, ["t:jobs"], cap=5) == {"t:jobs": 4}
        with pytest.raises(Backpressure):  # two do not fit: neither is written
            await client.publish_batch(_jobs("bp", 10, 2))
        with pytest.raises(Backpressure, match="on their own"):  # never fits: at once
            await client.publish_batch(_jobs("bp", 20, 6), backlog_wait_s=60)
        assert await redis.xlen("t:jobs") == 5 and await _outbox_rows(pg, "bp") == 5
        (one,) = await client.publish_batch(_jobs("bp", 30, 1))
        assert one.entry_id is not None and await _outbox_rows(pg, "bp") == 6

    # the CLI: one line, exit 4, nothing written
    env = {**base_env, "MESH_PUBLISH_MAX_BACKLOG": "5"}
    r = await asyncio.to_thread(
        mesh, env, "publish", "t:jobs", "-t", "job.created", "-s", "bp", "-p", '{"n": 99}'
    )
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "backlog over its bound" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    waited = await asyncio.to_thread(
        mesh, env, "publish", "t:jobs", "-t", "job.created", "-p", '{"n": 98}',
        "--backlog-wait", "0.5",
    )  # fmt: skip
    assert waited.returncode == 4 and "after waiting 0.5 s" in waited.stderr, waited.stderr
    assert await redis.xlen("t:jobs") == 6 and await _outbox_rows(pg, "bp") == 6
    # no bound configured (0): the same publish goes through
    ok = await asyncio.to_thread(
        mesh, {**env, "MESH_PUBLISH_MAX_BACKLOG": "0"}, "publish", "t:jobs", "-t",
        "job.created", "-s", "bp", "-p", '{"n": 99}',
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr


async def test_a_waiting_publisher_gets_in_when_an_agent_drains(
    base_env: dict[str, str],
    redis: Redis,
    pg: asyncpg.Connection,
    agents: Callable[..., Any],
) -> None:
    async with Mesh(settings_from(base_env, publish_max_backlog=20)) as client:
        first = await client.publish_batch(_jobs("drain", 0, 20))
        waiting = asyncio.create_task(
            client.publish_batch(_jobs("drain", 20, 10), backlog_wait_s=120)
        )
        await asyncio.sleep(0.6)  # a few checks of the backlog: still full, nothing written
        assert not waiting.done()
        assert await redis.xlen("t:jobs") == 20 and await _outbox_rows(pg, "drain") == 20
        agents("worker")
        second = await asyncio.wait_for(waiting, timeout=120)

    await eventually(lambda: _worker_did(pg, 30), timeout=60, what="all 30 jobs handled")
    sent = {p.event_id for p in first + second}
    on_stream = [e.event_id for e in await stream_events(redis, "t:jobs")]
    assert sorted(on_stream) == sorted(sent) and len(sent) == 30  # each once, none lost
    assert await _outbox_rows(pg, "drain") == 30
    assert await actions(pg, "worker") == 30
    assert await redis.xlen("mesh:dlq") == 0


async def _worker_did(pg: asyncpg.Connection, n: int) -> bool:
    return await actions(pg, "worker") >= n


async def test_backlog_counts_a_group_whose_lag_redis_cannot_tell(redis: Redis) -> None:
    for i in range(1, 5):
        await redis.xadd("bl", {"a": i}, id=f"{i}-0")
    await redis.xgroup_create("bl", "g", id="0")
    await redis.xreadgroup("g", "c", {"bl": ">"}, count=1)  # 1-0 pending
    await redis.xdel("bl", "3-0")  # a deletion past the group: XINFO reports no lag
    (group,) = await redis.xinfo_groups("bl")
    assert group["lag"] is None
    assert await backlogs(redis, ["bl", "missing"], cap=10) == {"bl": 3, "missing": 0}
    assert await backlogs(redis, ["bl"], cap=1) == {"bl": 3}  # counted up to cap + 1: over
