"""MESH_MAX_ENVELOPE_BYTES is the limit the code uses (consumer before parsing, the `Mesh`
client before any XADD), and `mesh dlq retry` returns an entry only to its type's stream.
Real Redis and PostgreSQL; the consumer is a real agent process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentmesh import Mesh
from agentmesh.bus import dlq as steps
from agentmesh.client import InvalidRequest
from tests.audit_helpers import settings_from
from tests.conftest import eventually
from tests.helpers import dlq, job, publish

LIMIT = 2048


@pytest.fixture
async def small(
    audit_env: dict[str, str], redis: Redis, pg: asyncpg.Connection
) -> AsyncIterator[Mesh]:
    async with Mesh(settings_from(audit_env, max_envelope_bytes=LIMIT), operator="ann") as m:
        yield m


async def test_consumer_dead_letters_oversize_before_parsing_and_keeps_only_a_cut_copy(
    redis: Redis, agents: Callable[..., Any]
) -> None:
    agents("worker", MESH_MAX_ENVELOPE_BYTES=str(LIMIT))
    fine, over = job(1), job(2, fail="x" * 3000)  # valid; the second is over the setting
    assert len(over.to_wire()) > LIMIT
    await publish(redis, [fine, over])
    huge = b'{"pad": "' + b"y" * 300_000 + b'"}'  # over the old constant too: not even JSON
    await redis.xadd("t:jobs", {"envelope": huge})

    async def settled() -> list[dict[str, str]] | None:
        letters = await dlq(redis)
        return letters if len(letters) == 2 and await redis.xlen("t:done") == 1 else None

    letters = await eventually(settled, timeout=30, what="two oversize letters, one job done")
    for d in letters:
        assert d["reason"] == "oversize", d
        assert "MESH_MAX_ENVELOPE_BYTES (2048)" in d["error"], d["error"]
        assert len(d["envelope"].encode()) <= 4096
    assert any(over.event_id in d["envelope"] for d in letters)  # its head is kept


async def test_the_client_refuses_oversize_envelopes_before_any_xadd(
    small: Mesh, redis: Redis, pg: asyncpg.Connection
) -> None:
    with pytest.raises(InvalidRequest, match="MESH_MAX_ENVELOPE_BYTES"):
        await small.publish("job.created", {"n": 1, "fail": "x" * 3000})
    assert await redis.xlen("t:jobs") == 0
    assert await pg.fetchval("SELECT count(*) FROM mesh_outbox") == 0

    ok = job(3)
    await redis.xadd("mesh:dlq", {"envelope": ok.to_wire(), "stream": "t:jobs", "group": "w"})
    (entry,) = await small.dlq.list()
    with pytest.raises(InvalidRequest, match="MESH_MAX_ENVELOPE_BYTES"):
        await small.dlq.edit(entry.id, payload={"n": 3, "fail": "x" * 3000})
    big = job(4, fail="x" * 3000)  # dead-lettered under a larger limit, say
    await redis.xadd("mesh:dlq", {"envelope": big.to_wire(), "stream": "t:jobs", "group": "w"})
    outcomes = await small.dlq.retry(await small.dlq.list())
    assert [o.done for o in outcomes] == [True, False]
    assert "MESH_MAX_ENVELOPE_BYTES" in outcomes[1].detail
    assert await redis.xlen("t:jobs") == 1


async def test_dlq_retry_returns_entries_only_to_their_types_stream(
    small: Mesh, redis: Redis
) -> None:
    planted = {
        "home": ("t:jobs", job(10)),  # job.created is registered on t:jobs
        "other": ("t:done", job(11)),  # a planted entry naming another agent's stream
        "anywhere": ("mesh:evil", job(12)),
    }
    for stream, env in planted.values():
        await redis.xadd("mesh:dlq", {"envelope": env.to_wire(), "stream": stream, "group": "g"})
    outcomes = await small.dlq.retry(await small.dlq.list())  # what `--all` does
    assert [o.done for o in outcomes] == [True, False, False], outcomes
    for o in outcomes[1:]:
        assert o.detail.startswith("refused:") and "travels on 't:jobs'" in o.detail
        assert o.audit_event_id is None  # refused before anything was recorded or moved
    assert await redis.xlen("t:done") == 0 and not await redis.exists("mesh:evil")
    (moved,) = await redis.xrange("t:jobs")
    assert json.loads(moved[1][b"envelope"])["event_id"] == planted["home"][1].event_id
    assert len(await small.dlq.list()) == 2  # the refused ones stay, for a human to look at

    # the Lua step refuses on its own a target stream the entry does not name
    entry = (await small.dlq.list())[0]
    with pytest.raises(ResponseError, match="names another stream"):
        await steps.retry(redis, dlq_stream="mesh:dlq", dlq_id=entry.id, stream="t:jobs",
                          group="g", entry_id="0-1", envelope=entry.raw)  # fmt: skip
    assert len(await small.dlq.list()) == 2
