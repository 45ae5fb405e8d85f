"""`Mesh`, the operator's API, used as a library (no CLI process): what a notebook, an admin
API or another service would do. Real Redis, PostgreSQL and Kafka; real agent processes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

import tests.mesh_fixture  # noqa: F401  (registers the event types Mesh validates against)
from agentmesh import Mesh
from agentmesh.client import InvalidRequest, NotFound, SessionState
from tests.access_helpers import operator_env
from tests.audit_helpers import settings_from
from tests.conftest import eventually


@pytest.fixture
async def client(
    audit_env: dict[str, str], redis: Redis, pg: asyncpg.Connection
) -> AsyncIterator[Mesh]:
    async with Mesh(settings_from(await operator_env(audit_env, "ann"))) as mesh:
        yield mesh


async def test_publish_follow_status_and_replay_without_the_cli(
    client: Mesh, agents: Callable[..., Any], relays: Callable[..., Any], pg: asyncpg.Connection
) -> None:
    agents("worker")
    agents("finisher")
    relays()
    sent = await client.publish("job.created", {"n": 7}, session_id="lib-1")
    assert sent.stream == "t:jobs" and sent.entry_id is not None and sent.session_id == "lib-1"
    again = await client.publish("job.created", {"n": 7}, session_id="lib-1")
    assert again.event_id != sent.event_id  # a new event; the same payload is not deduplicated

    async def both_final() -> bool:
        n = await pg.fetchval("SELECT count(*) FROM mesh_actions WHERE agent = 'finisher'")
        return int(n) == 2

    await eventually(both_final, what="both jobs reach the finisher")
    state = await client.session("lib-1")
    assert isinstance(state, SessionState) and state.session_id == "lib-1"
    assert state.actions == 4 and state.status == "running"  # two agents, two jobs each
    assert [s.session_id for s in await client.sessions(status="running")] == ["lib-1"]

    status = await client.status(streams={"t:jobs", "t:done", "t:final"})
    by_group = {(s.stream, s.group): s for s in status.streams}
    assert by_group[("t:jobs", "worker")].pending == 0
    assert by_group[("t:jobs", "worker")].lag == 0
    assert ("t:final", None) in by_group  # registered, nobody consumes it: still shown
    assert status.dlq.depth == 0

    assert await client.wait_published(session_id="lib-1", timeout_s=60) == 0
    relay = await client.relay_status()
    assert relay.backlog_rows == 0 and relay.slots >= 1 and relay.slots_owned == relay.slots
    rep = await client.replay("lib-1")
    types = [e.envelope.type for e in rep.events]
    assert types.count("job.created") == 2 and types.count("job.final") == 2
    assert types.index("job.created") < types.index("job.done") < types.index("job.final")


async def test_bad_requests_are_refused_before_anything_is_written(
    client: Mesh, pg: asyncpg.Connection, redis: Redis
) -> None:
    with pytest.raises(InvalidRequest, match=r"invalid job\.created payload"):
        await client.publish("job.created", {"n": "seven"})
    with pytest.raises(InvalidRequest, match="travels on stream 't:jobs'"):
        await client.publish("job.created", {"n": 1}, stream="t:elsewhere")
    with pytest.raises(InvalidRequest):
        await client.publish("no.such.type", {})
    with pytest.raises(InvalidRequest, match="unknown status"):
        await client.sessions(status="sleeping")
    assert await pg.fetchval("SELECT count(*) FROM mesh_outbox") == 0
    assert await redis.exists("t:jobs") == 0
    with pytest.raises(NotFound, match="not waiting for a decision"):
        await client.approve("no-such-session")
    with pytest.raises(NotFound):
        await client.dlq.show("1-0")
    assert await client.session("no-such-session") is None


async def test_dead_letters_are_listed_fixed_and_retried_through_the_library(
    client: Mesh, agents: Callable[..., Any], pg: asyncpg.Connection
) -> None:
    agents("worker")
    await client.publish("job.created", {"n": 3, "fail": "nonretryable"}, session_id="lib-dlq")

    async def dead_lettered() -> bool:
        return len(await client.dlq.list()) == 1

    await eventually(dead_lettered, what="the job is dead-lettered")
    (entry,) = await client.dlq.list()
    assert entry.agent == "worker" and entry.session_id == "lib-dlq"
    fixed = await client.dlq.edit(entry.id, payload={"n": 3}, reason="drop the failure flag")
    (outcome,) = await client.dlq.retry(await client.dlq.select(fixed.new_id), reason="fixed")
    assert outcome.done and outcome.audit_event_id

    async def handled() -> bool:
        n = await pg.fetchval("SELECT count(*) FROM mesh_actions WHERE session_id = 'lib-dlq'")
        return int(n) == 1

    await eventually(handled, what="the fixed job is handled once")
    ops = await pg.fetch(
        "SELECT envelope::json->'payload' AS p FROM mesh_outbox WHERE type = 'mesh.operator' "
        "ORDER BY id"
    )
    actions = [(json.loads(r["p"])["action"], json.loads(r["p"])["operator"]) for r in ops]
    assert actions == [("dlq.edit", "ann"), ("dlq.retry", "ann")]
    assert await client.dlq.list() == []
