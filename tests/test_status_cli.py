"""`mesh status` against a running agent: streams, groups, consumers, DLQ, breakers, relay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from agentmesh.schemas import registry
from tests.conftest import AgentProcess, eventually
from tests.helpers import mesh, publish


async def _status(env: dict[str, str]) -> dict[str, Any]:
    r = await asyncio.to_thread(mesh, env, "status", "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


async def test_status_shows_groups_and_a_breaker_opening_and_closing(
    base_env: dict[str, str], redis: Redis, agents: Callable[..., AgentProcess]
) -> None:
    await redis.set("t:flaky-down", 1)
    calls = [registry.make("dep.call", {"n": i}, session_id="s-status") for i in range(6)]
    await publish(redis, calls)
    agents("caller", MESH_BATCH_SIZE="1", MESH_MAX_DELIVERIES="50")

    async def breaker(state: str) -> bool:
        data = await _status(base_env)
        return any(
            b["agent"] == "caller" and b["dependency"] == "flaky" and b["state"] == state
            for b in data["breakers"]
        )

    await eventually(lambda: breaker("open"), timeout=30, what="breaker reported open")
    data = await _status(base_env)
    (dep,) = [r for r in data["streams"] if r["stream"] == "t:dep" and r["group"] == "caller"]
    assert dep["length"] == 6 and dep["pending"] >= 1 and dep["consumers"]
    assert all(c["idle_ms"] >= 0 for c in dep["consumers"])
    assert data["dlq"]["depth"] == 0 and data["relay"]["backlog_rows"] >= 0
    human = await asyncio.to_thread(mesh, base_env, "status")
    assert human.returncode == 0 and "t:dep" in human.stdout and "open" in human.stdout
    assert "DLQ mesh:dlq" in human.stdout and "relay: backlog" in human.stdout

    # another application's stream in the same database is not the mesh's: hidden by default
    await redis.xadd("someone-else:events", {"x": "1"})
    data = await _status(base_env)
    assert "someone-else:events" not in {r["stream"] for r in data["streams"]}
    every = await asyncio.to_thread(mesh, base_env, "status", "--all-streams", "--json")
    assert "someone-else:events" in {r["stream"] for r in json.loads(every.stdout)["streams"]}

    await redis.delete("t:flaky-down")
    await eventually(lambda: breaker("closed"), timeout=40, what="breaker reported closed")


def test_status_exits_3_when_redis_is_unreachable(base_env: dict[str, str]) -> None:
    from agentmesh import devstack

    env = {**base_env, "MESH_REDIS_URL": f"redis://127.0.0.1:{devstack.free_port()}/0"}
    r = mesh(env, "status", "--json")
    assert r.returncode == 3 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
