"""Periodic jobs of an agent (`@agent.every(seconds)`): deadlines, sweeps, reminders.

A job runs in every replica's process, but one replica at a time: each run holds a
transaction-scoped Postgres advisory lock named after the agent and the job, and skips the
round when another replica holds it. What a job publishes goes through the outbox first
(`Tick.publish`), like a handler's events, so it reaches the audit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from agentmesh.bus.streams import Streams
from agentmesh.schemas.envelope import Envelope

log = structlog.get_logger("agentmesh.periodic")


@dataclass(kw_only=True)
class Tick:
    agent: str
    pool: asyncpg.Pool
    bus: Streams

    async def publish(self, events: Sequence[tuple[str, Envelope]]) -> list[str | None]:
        from agentmesh.outbox.publish import publish_events

        return await publish_events(self.pool, self.bus, events)


Job = Callable[[Tick], Awaitable[None]]


@dataclass(frozen=True)
class PeriodicSpec:
    name: str
    interval_s: float
    fn: Job


async def run_periodic(spec: PeriodicSpec, tick: Tick, stop: asyncio.Event) -> None:
    lock_name = f"mesh.periodic:{tick.agent}:{spec.name}"
    while not stop.is_set():
        async with tick.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", lock_name):
                await spec.fn(tick)
        try:
            async with asyncio.timeout(spec.interval_s):
                await stop.wait()
        except TimeoutError:
            pass
