"""Helpers for the Kafka audit-log tests: writing outbox rows, reading the whole topic back."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import defaultdict
from typing import Any

import asyncpg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

import tests.mesh_fixture  # noqa: F401  (registers the test event types)
from agentmesh.outbox import kafka, outbox_rows
from agentmesh.outbox.outbox_rows import OutboxRows
from agentmesh.schemas import Envelope, registry
from agentmesh.settings import Settings


def settings_from(env: dict[str, str], **overrides: Any) -> Settings:
    """The Settings a process started with `env` would load."""
    values: dict[str, Any] = {
        k.removeprefix("MESH_").lower(): v for k, v in env.items() if k.startswith("MESH_")
    }
    return Settings(**{**values, **overrides})


def event(session: str, seq: int) -> Envelope:
    return registry.make("job.done", {"n": seq}, session_id=session, source="loadgen")


async def insert(conn: asyncpg.Connection | asyncpg.Pool, envs: list[Envelope]) -> None:
    """Outbox rows as an agent's unit of work writes them (audit-only: no Redis stream)."""
    rows = OutboxRows()
    for e in envs:
        rows.add(None, e)
    await outbox_rows.insert(conn, rows, skip_existing=False)


class LoadGen:
    """Writes rows for `sessions` sessions, a sequence number each, one transaction per tick,
    until stopped: the order every session's events must keep in Kafka."""

    def __init__(self, pool: asyncpg.Pool, sessions: int, per_tick: int = 20) -> None:
        self.pool = pool
        self.sessions = [f"load-{i}" for i in range(sessions)]
        self.per_tick = per_tick
        self.seq: dict[str, int] = defaultdict(int)
        self.written = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            envs = []
            for _ in range(self.per_tick):
                s = self.sessions[i % len(self.sessions)]
                i += 1
                envs.append(event(s, self.seq[s]))
                self.seq[s] += 1
            await insert(self.pool, envs)
            self.written += len(envs)
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def read_topic(s: Settings) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the audit topic, partition by partition, in offset order."""
    c = kafka.consumer(s)
    await c.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        parts = c.partitions_for_topic(s.audit_topic)
        if not parts:
            await c.force_metadata_update()
            parts = c.partitions_for_topic(s.audit_topic) or set()
        for p in sorted(parts):
            tp = TopicPartition(s.audit_topic, p)
            c.assign([tp])
            c.seek(tp, 0)
            pos, deadline = 0, time.monotonic() + 30
            while time.monotonic() < deadline:
                got = (await c.getmany(tp, timeout_ms=300, max_records=5000)).get(tp, [])
                records += got
                pos = got[-1].offset + 1 if got else pos
                high = c.highwater(tp)
                if high is not None and pos >= high:
                    break
    finally:
        await c.stop()
    return records


def first_copies(records: list[ConsumerRecord[bytes, bytes]]) -> dict[str, list[int]]:
    """Per session: the sequence numbers in log order, first copy of each event id only."""
    seen: set[bytes] = set()
    out: dict[str, list[int]] = defaultdict(list)
    for r in records:
        headers = dict(r.headers)
        eid = headers["event_id"]
        if eid in seen:
            continue
        seen.add(eid)
        env = Envelope.model_validate_json(r.value)
        out[env.session_id].append(env.payload["n"])
    return out


async def drain_outbox(s: Settings, pg: asyncpg.Connection, timeout: float = 60) -> None:
    """An in-process relay publishes until no outbox row is unpublished, then closes."""
    from agentmesh.outbox.relay import Relay
    from tests.conftest import eventually

    relay = Relay(s)
    await relay.start()
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: _no_backlog(pg), timeout=timeout, what="outbox drained")
    finally:
        stop.set()
        await task
        await relay.close()


async def _no_backlog(pg: asyncpg.Connection) -> bool:
    return await backlog(pg) == 0


async def backlog(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM mesh_outbox WHERE published_at IS NULL"))


async def metric(port: int, name: str) -> float:
    """One sample's value from a process's /metrics (0 when absent or not serving yet)."""

    def get() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        except OSError:  # URLError: the process has not opened its port yet
            return ""

    for line in (await asyncio.to_thread(get)).splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
