"""Latency of a hop, one message at a time: an agent process next to a raw redis-py process,
and a chain of four agents. Used by bench/targets.py (`make bench`).

The driver XADDs one envelope to the input stream, then waits (XREAD BLOCK) for the event
that comes out at the end, and only then sends the next: every figure is the time from the
XADD call to the reply carrying the output, so it includes both Redis round trips of the
driver. The first `warmup` messages are not counted (connections, prepared statements).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _procs import MeshProcs
from bench_agent import (
    AGENT_NAME,
    CHAIN_DONE_STREAM,
    CHAIN_HOPS,
    IN_STREAM,
    OUT_STREAM,
    ChainStep,
    chain_stream,
    chain_type,
)
from redis.asyncio import Redis
from runtime_throughput import HERE, RAW_GROUP, ROOT, Stack, blocked_readers

from agentmesh.bus.entry import Outgoing
from agentmesh.bus.streams import Streams
from agentmesh.schemas import registry

READ_TIMEOUT_MS = 20_000


@dataclass
class Latency:
    key: str
    name: str
    samples: list[float] = field(default_factory=list)  # seconds
    note: str = ""
    checks: list[str] = field(default_factory=list)

    def ms(self, q: float) -> float | None:
        """The q-quantile in milliseconds (q=0.5: the median)."""
        if not self.samples:
            return None
        if q == 0.5:
            return statistics.median(self.samples) * 1000
        cuts = statistics.quantiles(self.samples, n=100, method="inclusive")
        return cuts[round(q * 100) - 1] * 1000


def chain_inputs(n: int) -> list[bytes]:
    return [
        registry.make(chain_type(1), ChainStep(n=i), session_id=f"chain-{i % 64}").to_wire()
        for i in range(n)
    ]


async def drive(
    url: str,
    in_stream: str,
    out_stream: str,
    wires: Sequence[bytes],
    warmup: int,
    *,
    mesh: bool,
) -> list[float]:
    """One message at a time; seconds from XADD to the output's arrival, after warm-up.

    `mesh`: publish as the mesh does (`mesh publish`, Mesh.publish): the deduplicating XADD
    of bus/lua/publish.lua; else a plain XADD."""
    w, r = Redis.from_url(url), Redis.from_url(url)
    bus = Streams(w, group="bench-driver", consumer="driver")
    last: Any = "0-0"
    out: list[float] = []
    try:
        for i, wire in enumerate(wires):
            event_id = json.loads(wire)["event_id"]
            t0 = time.perf_counter()
            if mesh:
                await bus.publish([Outgoing(in_stream, event_id, wire)])
            else:
                await w.xadd(in_stream, {b"envelope": wire})
            reply: Any = await r.xread({out_stream: last}, count=1, block=READ_TIMEOUT_MS)
            took = time.perf_counter() - t0
            if not reply:
                raise TimeoutError(f"message {i}: nothing on {out_stream} after 20s")
            last = reply[0][1][0][0]
            if i >= warmup:
                out.append(took)
    finally:
        await w.aclose()
        await r.aclose()
    return out


async def wait_readers(stack: Stack, n: int, alive: Callable[[], None]) -> None:
    """Until `n` clients block in XREADGROUP: every consumer process is up and waiting."""
    deadline = time.monotonic() + 60
    while await blocked_readers(stack.redis) < n:
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} consumer processes did not start reading within 60s")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


def mesh_env(stack: Stack) -> dict[str, str]:
    env = dict(os.environ)  # MESH_* knobs set by the caller apply here too
    env.update(
        MESH_REDIS_URL=stack.cfg.redis_url,
        MESH_POSTGRES_DSN=stack.cfg.postgres_dsn,
        MESH_HTTP_PORT="0",
        MESH_GRACE_S="5",
        MESH_LOG_LEVEL="WARNING",
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
    )
    return env


async def bench_raw_hop(stack: Stack, wires: Sequence[bytes], warmup: int) -> Latency:
    res = Latency("raw-hop", "raw redis-py hop (own process, plain asyncio)")
    await stack.reset()
    await stack.create_group(IN_STREAM, RAW_GROUP)
    log_dir = Path(tempfile.mkdtemp(prefix="raw-hop-", dir=stack.cfg.root))
    with (log_dir / "raw-hop.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once, returns at once)
            [sys.executable, str(HERE / "raw_hop.py"), stack.cfg.redis_url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"raw hop exited with {proc.returncode}")

    try:
        await wait_readers(stack, 1, alive)
        res.samples = await drive(
            stack.cfg.redis_url, IN_STREAM, OUT_STREAM, wires, warmup, mesh=False
        )
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return res


async def bench_mesh_hop(stack: Stack, wires: Sequence[bytes], warmup: int) -> Latency:
    res = Latency("mesh-hop", f"agentmesh hop (`mesh agent run {AGENT_NAME}`)")
    await stack.reset()
    log_dir = Path(tempfile.mkdtemp(prefix="hop-", dir=stack.cfg.root))
    procs = MeshProcs(
        ["agent", "run", AGENT_NAME, "-m", "bench_agent"], "agent", 1, mesh_env(stack), log_dir
    )
    try:
        await wait_readers(stack, 1, procs.check_alive)
        res.samples = await drive(
            stack.cfg.redis_url, IN_STREAM, OUT_STREAM, wires, warmup, mesh=True
        )
    finally:
        await asyncio.to_thread(procs.stop)
    n = await stack.pg.fetchval("SELECT count(*) FROM mesh_actions")
    if n != len(wires):
        res.checks.append(f"mesh_actions={n}, expected {len(wires)}")
    return res


async def bench_chain(stack: Stack, wires: Sequence[bytes], warmup: int) -> Latency:
    res = Latency("chain", f"{CHAIN_HOPS}-hop chain of trivial agents, one process each")
    await stack.reset()
    log_dir = Path(tempfile.mkdtemp(prefix="chain-", dir=stack.cfg.root))
    env = mesh_env(stack)
    procs = [
        MeshProcs(
            ["agent", "run", f"chain-{i}", "-m", "bench_agent"], f"chain-{i}", 1, env, log_dir
        )
        for i in range(1, CHAIN_HOPS + 1)
    ]

    def alive() -> None:
        for p in procs:
            p.check_alive()

    try:
        await wait_readers(stack, CHAIN_HOPS, alive)
        res.samples = await drive(
            stack.cfg.redis_url, chain_stream(1), CHAIN_DONE_STREAM, wires, warmup, mesh=True
        )
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
    n = await stack.pg.fetchval("SELECT count(*) FROM mesh_actions")
    if n != CHAIN_HOPS * len(wires):
        res.checks.append(f"mesh_actions={n}, expected {CHAIN_HOPS * len(wires)}")
    return res
