"""The mesh at a glance, read from Redis and Postgres (no agent is asked).

Streams are found with SCAN TYPE stream. The mesh's own are shown: those with a consumer
group, and those its event types are registered on (a stream nobody consumes yet is worth
seeing); `known=None` shows every stream in the database. Per group: lag and pending; per
consumer: pending and idle time. Breaker states come from the short-lived reports each agent
replica writes (agents/runner.py); shared budgets from their buckets (bus/budget.py); the
relay backlog and partition owners from Postgres.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from agentmesh.agents.runner import BREAKER_REPORT_PREFIX
from agentmesh.bus.budget import Buckets, BucketState
from agentmesh.outbox.relay import MEMBER_LOCK_CLASS, SLOT_LOCK_CLASS

if TYPE_CHECKING:
    from agentmesh.client.mesh import Mesh


@dataclass(frozen=True, kw_only=True)
class ConsumerStatus:
    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True, kw_only=True)
class StreamStatus:
    stream: str
    length: int
    group: str | None  # None: no consumer group yet
    lag: int | None = None  # None: Redis cannot tell (entries were deleted past the group)
    pending: int | None = None
    consumers: list[ConsumerStatus] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class BreakerStatus:
    agent: str
    replica: str
    dependency: str
    state: str  # closed, open, half-open
    opened: int  # how often it opened since the replica started
    last_opened_at: float | None


@dataclass(frozen=True, kw_only=True)
class RelayMember:
    pid: int  # the relay's PostgreSQL backend pid
    client_addr: str | None
    slots: int


@dataclass(frozen=True, kw_only=True)
class RelayStatus:
    topic: str
    backlog_rows: int
    backlog_oldest_s: float
    slots: int
    slots_owned: int
    relays: list[RelayMember]


@dataclass(frozen=True, kw_only=True)
class DlqDepth:
    stream: str
    depth: int


@dataclass(frozen=True, kw_only=True)
class MeshStatus:
    streams: list[StreamStatus]
    dlq: DlqDepth
    breakers: list[BreakerStatus]
    relay: RelayStatus
    budgets: list[BucketState] = field(default_factory=list)  # shared rate budgets, by name


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


async def collect(mesh: Mesh, *, known: set[str] | None = None) -> MeshStatus:
    redis, dlq_stream = mesh.redis, mesh.settings.dlq_stream
    found = {_s(k) async for k in redis.scan_iter(_type="stream", count=500)}
    rows: list[StreamStatus] = []
    for stream in sorted(found | (known or set())):
        if stream == dlq_stream:
            continue
        length = int(await redis.xlen(stream))
        try:
            groups = await redis.xinfo_groups(stream)
        except ResponseError:
            groups = []
        if known is not None and not groups and stream not in known:
            continue  # not the mesh's: another application's stream in the same database
        if not groups:
            rows.append(StreamStatus(stream=stream, length=length, group=None))
        for g in groups:
            name = _s(g["name"])
            consumers = await redis.xinfo_consumers(stream, name)
            lag = g.get("lag")
            rows.append(StreamStatus(
                stream=stream, length=length, group=name,
                lag=int(lag) if lag is not None else None, pending=int(g["pending"]),
                consumers=[ConsumerStatus(name=_s(c["name"]), pending=int(c["pending"]),
                                          idle_ms=int(c["idle"])) for c in consumers],
            ))  # fmt: skip
    breakers: list[BreakerStatus] = []
    async for key in redis.scan_iter(match=f"{BREAKER_REPORT_PREFIX}*", count=500):
        raw = await redis.get(key)
        if raw:
            report = json.loads(raw)
            for dep, b in sorted(report["states"].items()):
                breakers.append(BreakerStatus(
                    agent=report["agent"], replica=report["replica"], dependency=dep,
                    state=b["state"], opened=b["opened"], last_opened_at=b["last_opened_at"],
                ))  # fmt: skip
    depth = int(await redis.xlen(dlq_stream))
    return MeshStatus(
        streams=rows,
        dlq=DlqDepth(stream=dlq_stream, depth=depth),
        breakers=sorted(breakers, key=lambda b: (b.agent, b.dependency, b.replica)),
        relay=await relay_status(mesh),
        budgets=await Buckets(redis).states(),
    )


async def relay_status(mesh: Mesh) -> RelayStatus:
    """Backlog (rows, age of the oldest), live relays and the partitions each owns."""
    pool = await mesh.pg()
    backlog = await pool.fetchrow(
        """SELECT count(*) AS rows, COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)
                  ::float8 AS oldest FROM mesh_outbox WHERE published_at IS NULL"""
    )
    relays = await pool.fetch(
        """SELECT l.pid, a.client_addr::text AS client_addr,
                  (SELECT count(*) FROM pg_locks s WHERE s.pid = l.pid
                    AND s.locktype = 'advisory' AND s.classid = $2 AND s.granted) AS slots
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.objid = 0
             AND l.objsubid = 2 AND l.granted
           ORDER BY l.pid""",
        MEMBER_LOCK_CLASS,
        SLOT_LOCK_CLASS,
    )
    slots = await pool.fetchval("SELECT slots FROM mesh_relay_config") or 0
    assert backlog is not None
    members = [RelayMember(pid=r["pid"], client_addr=r["client_addr"], slots=int(r["slots"]))
               for r in relays]  # fmt: skip
    return RelayStatus(
        topic=mesh.settings.audit_topic,
        backlog_rows=int(backlog["rows"]),
        backlog_oldest_s=float(backlog["oldest"]),
        slots=int(slots),
        slots_owned=sum(m.slots for m in members),
        relays=members,
    )
