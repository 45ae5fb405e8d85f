"""A stream's backlog, for backpressure at the edge: what its slowest group has not finished.

`backlog = max over the stream's groups of (lag + pending)`: lag is what the group has not
read yet, pending what it read and has not acked. A stream nobody consumes counts its whole
length. Computed by one Lua script (bus/lua/backlog.lua) so the numbers of all the groups are
one snapshot, and so a producer in another language can run the same script.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from agentmesh.bus.scripts import Scripts


async def backlogs(
    redis: Redis, streams: Sequence[str], *, cap: int, scripts: Scripts | None = None
) -> dict[str, int]:
    """stream -> backlog. A group whose lag Redis cannot tell is counted up to `cap` + 1."""
    names = sorted(set(streams))
    if not names:
        return {}
    reply = await (scripts or Scripts(redis)).backlog(keys=names, args=[max(cap, 0)])
    return {s: int(n) for s, n in zip(names, reply, strict=True)}
