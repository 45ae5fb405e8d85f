"""Small helpers shared by the integration tests: publishing and counting."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import asyncpg
from redis.asyncio import Redis

import tests.mesh_fixture  # noqa: F401  (registers the test event types)
from agentmesh.bus import Outgoing, Streams
from agentmesh.schemas import Envelope, registry
from tests.conftest import ROOT


def mesh(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `mesh ARGS…` as an operator would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def job(n: int, *, session: str = "s-1", **payload: Any) -> Envelope:
    return registry.make("job.created", {"n": n, **payload}, session_id=session)


async def publish(redis: Redis, envelopes: list[Envelope]) -> None:
    bus = Streams(redis, group="-", consumer="-")
    chunk = 500
    for i in range(0, len(envelopes), chunk):
        await bus.publish(
            [
                Outgoing(registry.stream_of(e.type), e.event_id, e.to_wire())
                for e in envelopes[i : i + chunk]
            ]
        )


async def actions(pg: asyncpg.Connection, agent: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM mesh_actions WHERE agent = $1", agent))


async def stream_events(redis: Redis, stream: str) -> list[Envelope]:
    rows = await redis.xrange(stream)
    return [Envelope.model_validate_json(f[b"envelope"]) for _, f in rows]


async def group_state(redis: Redis, stream: str, group: str) -> dict[str, int]:
    """pending and lag of a group; {} when the stream or group does not exist (yet).

    Lag is counted from the last-delivered id, not taken from XINFO, because Redis reports
    no lag (None) for a group whose read counter it lost, e.g. after an AOF reload."""
    if not await redis.exists(stream):
        return {}
    for g in await redis.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            last = g["last-delivered-id"]
            lag = len(await redis.xrange(stream, min=b"(" + last, max="+"))
            return {"pending": int(g["pending"]), "lag": lag}
    return {}


async def dlq(redis: Redis) -> list[dict[str, str]]:
    rows = await redis.xrange("mesh:dlq")
    return [
        {k.decode(): v.decode(errors="replace") for k, v in fields.items()} for _, fields in rows
    ]
