"""What a consumer loop gets from the process that runs it, and nothing more.

`ConsumerLoop` (agents/consumer.py) used to receive the whole `Runner` and read nine of its
attributes, so the two modules imported each other. The runner now builds one `ConsumerDeps`
after it has connected to Redis and Postgres and hands it to each of its loops; consumer.py
never imports runner.py. Every loop of a process shares these objects: the connections, the
metrics, the breakers (through `dependencies` and the two stream queries) and the stop event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from agentmesh.agents.agent import Agent
from agentmesh.agents.metrics import Metrics
from agentmesh.agents.resilience import Dependency
from agentmesh.settings import Settings


@dataclass(frozen=True, kw_only=True)
class ConsumerDeps:
    settings: Settings
    agent: Agent
    redis: Redis  # each loop makes its own `Streams` view on it (group = agent, its consumer)
    pool: asyncpg.Pool  # each loop makes its own `UnitOfWork` on it
    metrics: Metrics
    dependencies: dict[str, Dependency]  # handed to every handler's Context
    paused_streams: Callable[[], tuple[set[str], set[str]]]
    """(paused, probing): streams with an open breaker, or one due a probe."""
    stream_modes: Callable[[], tuple[list[str], list[str]]]
    """(normal, probe): streams to read as usual, and those to read one probe entry from."""
    stop_event: asyncio.Event
    """Set when the process is stopping: a failing commit then gives up instead of retrying."""
