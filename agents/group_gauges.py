"""Sampling the group-scope gauges of one agent process (lag, pending, DLQ depth).

Every replica samples the same group from Redis, so each exports the same value: the
documented aggregation is `max()` (agents/metrics.py). Sampling in every replica rather than
in one elected replica keeps the numbers there as long as any replica lives, with no leader
to lose; `max()` makes the copies harmless. Three cheap commands per stream per pass.
"""

from __future__ import annotations

from agentmesh.agents.metrics import Metrics
from agentmesh.bus.streams import Streams


async def sample_group_gauges(
    streams: Streams, agent: str, inputs: list[str], metrics: Metrics, dlq_stream: str
) -> None:
    """Set mesh_group_pending/lag for each input stream, and mesh_dlq_depth (one XLEN)."""
    for stream in inputs:
        info = await streams.group_info(stream)
        metrics.pending.labels(agent, stream).set(info["pending"])
        metrics.lag.labels(agent, stream).set(info["lag"])
    metrics.dlq_depth.labels(dlq_stream).set(int(await streams.redis.xlen(dlq_stream)))
