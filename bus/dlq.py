"""Manual DLQ steps, each one atomic in Redis: retry, drop, replace (after an edit).

Each returns None when the DLQ entry is already gone, so an entry acted on twice (two
operators, or a command re-run after a crash) is acted on once.
"""

from __future__ import annotations

from redis.asyncio import Redis

from agentmesh.bus.scripts import Scripts
from agentmesh.bus.streams import failures_key


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


async def retry(
    redis: Redis,
    *,
    dlq_stream: str,
    dlq_id: str,
    stream: str,
    group: str,
    entry_id: str,
    envelope: bytes,
) -> str | None:
    """Back onto `stream` as a new entry (so its delivery count starts again at 1) with the
    same bytes and so the same event id: a consumer that had already acted skips it."""
    reply = await Scripts(redis).dlq_retry(
        keys=[dlq_stream, stream, failures_key(stream, group, entry_id)], args=[dlq_id, envelope]
    )
    return _s(reply)


async def drop(redis: Redis, *, dlq_stream: str, dlq_id: str) -> bool:
    return bool(await redis.xdel(dlq_stream, dlq_id))


async def replace(
    redis: Redis, *, dlq_stream: str, dlq_id: str, fields: dict[bytes, bytes]
) -> str | None:
    args: list[bytes | str] = [dlq_id]
    for key, value in fields.items():
        args += [key, value]
    return _s(await Scripts(redis).dlq_replace(keys=[dlq_stream], args=args))
