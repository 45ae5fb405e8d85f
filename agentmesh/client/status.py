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
from agentmesh.outbox.relay import LIVE_LOCK_CLASS

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
    name: str
    state: str  # live | not renewing (frozen or hung: its leases run out) | gone
    slots: int  # partitions whose lease it holds and renewed in time


@dataclass(frozen=True, kw_only=True)
class PartitionLease:
    partition: int
    owner: str | None  # None: free
    epoch: int  # +1 at every change of owner
    lease_age_s: float | None  # since its owner last renewed it
    expires_in_s: float | None  # negative: expired, any relay may take it
    last_progress_s: float | None  # since its owner last published or caught up there
    backlog_rows: int
    backlog_oldest_s: float


@dataclass(frozen=True, kw_only=True)
class RelayStatus:
    topic: str
    backlog_rows: int
    backlog_oldest_s: float
    slots: int
    slots_owned: int
    relays: list[RelayMember]
    partitions: list[PartitionLease] = field(default_factory=list)


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


_LIVE = f"""live AS (SELECT objid::bigint AS token FROM pg_locks WHERE locktype = 'advisory'
            AND granted AND classid = {LIVE_LOCK_CLASS} AND objsubid = 2)"""


async def relay_status(mesh: Mesh) -> RelayStatus:
    """Backlog (rows, age of the oldest), relays, and each partition's lease: owner, epoch,
    lease age, last progress, backlog (outbox/relay_slots.py)."""
    pool = await mesh.pg()
    topic = mesh.settings.audit_topic
    backlog = await pool.fetchrow(
        """SELECT count(*) AS rows, COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)
                  ::float8 AS oldest FROM mesh_outbox WHERE published_at IS NULL"""
    )
    assert backlog is not None
    slots = int(await pool.fetchval("SELECT slots FROM mesh_relay_config") or 0)
    members = await pool.fetch(
        f"""WITH {_LIVE}
            SELECT m.name, m.token IN (SELECT token FROM live) AS locked, m.expires_at > now() AS
                   renewing,
                   (SELECT count(*) FROM mesh_relay_leases l WHERE l.topic = m.topic
                     AND l.owner_token = m.token AND l.expires_at > now()) AS slots
            FROM mesh_relay_members m
            WHERE m.topic = $1 AND (m.expires_at > now() OR m.token IN (SELECT token FROM live))
            ORDER BY m.started_at, m.name""",
        topic,
    )
    leases = await pool.fetch(
        """SELECT l.kafka_partition AS p, l.owner, l.epoch,
                  EXTRACT(EPOCH FROM now() - l.renewed_at)::float8 AS age,
                  EXTRACT(EPOCH FROM l.expires_at - now())::float8 AS left,
                  EXTRACT(EPOCH FROM now() - l.progress_at)::float8 AS progress,
                  COALESCE(b.rows, 0) AS rows, COALESCE(b.oldest, 0) AS oldest
           FROM mesh_relay_leases l LEFT JOIN (
               SELECT session_hash % $2 AS p, count(*) AS rows,
                      EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest
               FROM mesh_outbox WHERE published_at IS NULL AND $2 > 0 GROUP BY 1) b
             ON b.p = l.kafka_partition
           WHERE l.topic = $1 AND l.kafka_partition < $2 ORDER BY l.kafka_partition""",
        topic,
        slots,
    )
    relays = [
        RelayMember(
            name=r["name"],
            state="gone" if not r["locked"] else "live" if r["renewing"] else "not renewing",
            slots=int(r["slots"]),
        )
        for r in members
    ]
    partitions = [
        PartitionLease(
            partition=r["p"],
            owner=r["owner"],
            epoch=int(r["epoch"]),
            lease_age_s=r["age"],
            expires_in_s=r["left"],
            last_progress_s=r["progress"],
            backlog_rows=int(r["rows"]),
            backlog_oldest_s=float(r["oldest"]),
        )
        for r in leases
    ]
    return RelayStatus(
        topic=topic,
        backlog_rows=int(backlog["rows"]),
        backlog_oldest_s=float(backlog["oldest"]),
        slots=slots,
        slots_owned=sum(1 for p in partitions if p.owner and (p.expires_in_s or 0) > 0),
        relays=relays,
        partitions=partitions,
    )
