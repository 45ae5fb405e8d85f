"""The raw hop of the latency benchmark, as its own process (the agent hop is one too):
`python bench/raw_hop.py REDIS_URL` runs the raw redis-py loop of runtime_throughput.py
(XREADGROUP, json, one handoff, XADD + XACK in one pipeline) on plain asyncio until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from redis.asyncio import Redis  # noqa: E402
from runtime_throughput import raw_loop  # noqa: E402


async def main(url: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    redis = Redis.from_url(url)
    try:
        await raw_loop(redis, stop, None)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
