"""Partition leases: a relay that stops making progress loses its partitions, and a relay that
wakes after losing them neither sends nor marks there (outbox/relay_slots.py).

Two `mesh relay run` processes share the 4 partitions under load (agents' units of work written
from the test: mesh_actions rows, and their `mesh.action` audit events in the outbox). One of
them stops making progress for much longer than the lease: frozen by SIGSTOP, or with its
connection to the broker stalled by a proxy while its process runs.

The bound on the backlog's oldest age while it is stopped: the lease (2 s here) from the
stopped relay's last renewal, plus the age its oldest rows already had then (up to a round),
plus the survivor's takeover check (every 0.5 s) and its first round over the partitions it
took; we allow 6 s for all but the lease, on a loaded shared machine (5.9 s seen at most).
Without leases the stopped relay's partitions are never taken over: the age grows with the stop.

Where it stops matters for the fences, so the frozen relay stops itself (SIGSTOP to itself,
`MESH_CRASH_MODE=stop`) under load at the two points where a late writer could do harm, and
gets SIGCONT after the takeover: between reading its rows and sending them (its send must be
refused by its own clock: no record of it reaches the broker), and between the broker's ack
and its mark (the mark must be refused by the lease epoch checked in its statement).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agentmesh import devstack
from agentmesh.outbox.relay import LEASE_HEADER
from agentmesh.outbox.replay import replay_session
from agentmesh.outbox.unit_of_work import UnitOfWork, Work
from agentmesh.schemas import registry
from agentmesh.schemas.audit import ACTION
from tests.audit_helpers import backlog, metric, read_topic, settings_from
from tests.conftest import MeshProcess, eventually
from tests.helpers import job, mesh
from tests.kafka_proxy import KafkaProxy

StartRelay = Callable[..., MeshProcess]

LEASE_S = 2.0
TAKEOVER_TIMEOUT_S = 30.0  # a generous deadline for the condition; the bound is the backlog's
AFTER_TAKEOVER_S = 2.0
BACKLOG_BOUND_S = LEASE_S + 6.0
SESSIONS = 16


class ActionLoad:
    """An agent's commits, one statement per tick: each input's mesh_actions row and its
    `mesh.action` audit event, one input per session per tick, until stopped."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.uow = UnitOfWork(pool, "leaseworker")
        self.sessions = [f"lease-{i}" for i in range(SESSIONS)]
        self.seq = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            works = []
            for s in self.sessions[tick % 2 :: 2]:
                inp = job(self.seq, session=s)
                self.seq += 1
                result = {"n": inp.payload["n"]}
                action = registry.make(
                    ACTION,
                    {"agent": "leaseworker", "input_event_id": inp.event_id,
                     "input_type": inp.type, "result": result},
                    session_id=s, causation_id=inp.event_id, source="leaseworker",
                )  # fmt: skip
                works.append(
                    Work(
                        idempotency_key=str(uuid.uuid4()),
                        input=inp,
                        stream="t:jobs",
                        entry_id="0-1",
                        result=result,
                        audit=[action],
                    )
                )
            res = await self.uow.commit(works)
            assert len(res.committed) == len(works)
            tick += 1
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


def relay_name(p: MeshProcess) -> str:
    return f"relay-{socket.gethostname()}-{p.proc.pid}"


async def _owned(port: int) -> float:
    return await metric(port, "mesh_relay_slots_owned")


async def _oldest(pg: asyncpg.Connection) -> float:
    return float(
        await pg.fetchval(
            """SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8
               FROM mesh_outbox WHERE published_at IS NULL"""
        )
    )


async def _watch_oldest(pg: asyncpg.Connection, seen: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        seen.append(await _oldest(pg))
        await asyncio.sleep(0.25)


@pytest.fixture
def lease_env(audit_env: dict[str, str]) -> dict[str, str]:
    return {**audit_env, "MESH_RELAY_LEASE_S": str(LEASE_S)}


async def _stopped_relay_loses_its_partitions(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    env: dict[str, str],
    relays: StartRelay,
    *,
    victim_env: dict[str, str],
    stop: Callable[[MeshProcess], Awaitable[None]],
    resume: Callable[[MeshProcess], Any],
    fenced: str | None = None,
    late_records: int | None = None,
) -> None:
    s = settings_from(env)
    ports = [devstack.free_port(), devstack.free_port()]
    victim = relays(MESH_HTTP_PORT=str(ports[0]), **victim_env)
    survivor = relays(MESH_HTTP_PORT=str(ports[1]))

    async def shared() -> bool:
        return [await _owned(p) for p in ports] == [2.0, 2.0]

    await eventually(shared, timeout=60, what="two relays own 2 partitions each")
    pool = await asyncpg.create_pool(stack.postgres_dsn, min_size=1, max_size=2)
    load = ActionLoad(pool)
    load.start()
    seen: list[float] = []
    watching = asyncio.Event()
    try:
        await asyncio.sleep(2)
        await stop(victim)
        watcher = asyncio.create_task(_watch_oldest(pg, seen, watching))
        await eventually(
            lambda: _owns_all(ports[1]), timeout=TAKEOVER_TIMEOUT_S, what="survivor took all"
        )
        await asyncio.sleep(AFTER_TAKEOVER_S)  # the backlog stays bounded under the survivor
        watching.set()
        await watcher
        resume(victim)
        await asyncio.sleep(2)  # the woken relay runs on under load
    finally:
        watching.set()
        await load.stop()
        await pool.close()
    # the partitions the survivor took were out of reach for at most lease + a round
    assert max(seen) < BACKLOG_BOUND_S, f"backlog oldest age during the stop: {max(seen):.1f} s"

    await eventually(lambda: _empty(pg), timeout=90, what="outbox drained")
    await eventually(lambda: _lost(ports[0]), timeout=30, what="the woken relay saw its loss")
    assert victim.alive() and survivor.alive()

    # the takeover is logged once per partition, by the survivor, with both relays' names
    took = [
        _fields(line) for line in survivor.log().splitlines() if "took over a partition" in line
    ]
    assert len(took) == 2, survivor.log()[-3000:]
    assert {t["from_relay"] for t in took} == {relay_name(victim)}
    assert {t["to_relay"] for t in took} == {relay_name(survivor)}
    assert len({t["partition"] for t in took}) == 2
    assert await metric(ports[0], "mesh_relay_leases_lost_total") == 2
    assert "lost a partition to another relay" in victim.log()
    if fenced is not None:  # the fence that stopped the woken relay, as it counted it
        assert await metric(ports[0], fenced) > 0

    await _status_shows_the_leases(env, ports[1], {relay_name(victim), relay_name(survivor)})
    late = await _no_late_send_or_mark_counts(s, pg)
    if late_records is not None:
        assert late == late_records
    await _replay_equals_the_action_log(s, pg)


async def _status_shows_the_leases(env: dict[str, str], port: int, names: set[str]) -> None:
    """`mesh relay status` and /metrics: each partition's owner, epoch, lease age, progress."""
    out = await asyncio.to_thread(mesh, env, "relay", "status", "--json")
    assert out.returncode == 0, out.stderr
    parts = json.loads(out.stdout)["partitions"]
    assert [p["partition"] for p in parts] == [0, 1, 2, 3]
    assert {p["owner"] for p in parts} <= names and max(p["epoch"] for p in parts) >= 2
    assert all(p["lease_age_s"] is not None and p["last_progress_s"] is not None for p in parts)
    human = await asyncio.to_thread(mesh, env, "relay", "status")
    assert human.returncode == 0 and "last progress" in human.stdout, human.stderr
    text = await asyncio.to_thread(_scrape, port)
    for gauge in ("lease_epoch", "lease_age_seconds", "lease_last_progress_seconds"):
        assert text.count(f"mesh_relay_{gauge}{{") == 4, text


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _fields(line: str) -> dict[str, str]:
    """key=value pairs of a console log line."""
    return dict(re.findall(r"(\w+)=(\S+)", line))


async def _owns_all(port: int) -> bool:
    return await _owned(port) == 4.0


async def _lost(port: int) -> bool:
    return await metric(port, "mesh_relay_leases_lost_total") >= 2


async def _empty(pg: asyncpg.Connection) -> bool:
    return await backlog(pg) == 0


async def _no_late_send_or_mark_counts(s: Any, pg: asyncpg.Connection) -> int:
    """In each partition, a record whose lease epoch is below one written before it is a late
    write of a relay that had lost the partition (a batch it had handed to the broker before
    it stopped). Such a record may exist, but only as a copy of an event the new owner sent
    too; and no outbox row is marked as published at such a record. Returns how many there are."""
    records = await read_topic(s)
    late: set[tuple[int, int]] = set()
    ids_by_epoch: dict[tuple[int, int], set[bytes]] = {}
    stale: list[tuple[int, int, bytes]] = []
    top: dict[int, int] = {}
    for r in records:
        h = dict(r.headers)
        epoch = int(h[LEASE_HEADER])
        ids_by_epoch.setdefault((r.partition, epoch), set()).add(h["event_id"])
        if epoch < top.get(r.partition, 0):
            late.add((r.partition, r.offset))
            stale.append((r.partition, epoch, h["event_id"]))
        top[r.partition] = max(top.get(r.partition, 0), epoch)
    for p, epoch, eid in stale:
        newer = set().union(*(ids for (q, e), ids in ids_by_epoch.items() if q == p and e > epoch))
        assert eid in newer, f"a late record in partition {p} that its new owner did not send"
    marked = await pg.fetch("SELECT event_id::text, kafka_partition, kafka_offset FROM mesh_outbox")
    at = {(r.partition, r.offset): dict(r.headers)["event_id"].decode() for r in records}
    for row in marked:
        where = (row["kafka_partition"], row["kafka_offset"])
        assert at.get(where) == row["event_id"], f"row marked at a record it is not: {where}"
        assert where not in late, f"row marked at a late record of a lost lease: {where}"
    return len(late)


async def _replay_equals_the_action_log(s: Any, pg: asyncpg.Connection) -> None:
    """Every session replays from Kafka as Postgres recorded it: its outbox rows in id order,
    and its mesh.action events exactly the mesh_actions rows, in order."""
    for session in [f"lease-{i}" for i in range(SESSIONS)]:
        rep = await replay_session(s, session)
        outbox = await pg.fetch(
            "SELECT event_id::text FROM mesh_outbox WHERE session_id = $1 ORDER BY id", session
        )
        assert [e.envelope.event_id for e in rep.events] == [r["event_id"] for r in outbox]
        assert not rep.missing
        recorded = await pg.fetch(
            """SELECT input_event_id::text AS input FROM mesh_actions
               WHERE session_id = $1 ORDER BY id""",
            session,
        )
        replayed = [e.envelope.payload["input_event_id"] for e in rep.events
                    if e.envelope.type == ACTION]  # fmt: skip
        assert replayed == [r["input"] for r in recorded] and recorded, session


@pytest.mark.parametrize(
    ("point", "fenced", "late_records"),
    [
        ("relay_before_send", "mesh_relay_fenced_sends_total", 0),  # nothing reached the broker
        ("relay_after_ack", "mesh_relay_fenced_rows_total", None),
    ],
)
async def test_a_frozen_relay_loses_its_partitions_and_after_waking_neither_sends_nor_marks(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    lease_env: dict[str, str],
    relays: StartRelay,
    point: str,
    fenced: str,
    late_records: int | None,
) -> None:
    await _stopped_relay_loses_its_partitions(
        pg, stack, lease_env, relays,
        victim_env={"MESH_CRASH_AT": point, "MESH_CRASH_MODE": "stop", "MESH_CRASH_AFTER": "10"},
        stop=_stopped_itself, resume=lambda p: p.proc.send_signal(signal.SIGCONT),
        fenced=fenced, late_records=late_records,
    )  # fmt: skip


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _stopped_itself(p: MeshProcess) -> None:
    async def stopped() -> bool:
        return await asyncio.to_thread(_state, p.proc.pid) == "T"

    await eventually(stopped, timeout=60, what="the relay stopped itself at its fault point")


async def test_a_relay_whose_broker_connection_stalls_loses_its_partitions_the_same_way(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    lease_env: dict[str, str],
    relays: StartRelay,
) -> None:
    host, port = stack.kafka_bootstrap.rsplit(":", 1)
    proxy = KafkaProxy(host, int(port))
    await proxy.start()

    async def stall(_: MeshProcess) -> None:
        proxy.stall()

    try:
        await _stopped_relay_loses_its_partitions(
            pg, stack, lease_env, relays,
            victim_env={"MESH_KAFKA_BOOTSTRAP": proxy.bootstrap},
            stop=stall, resume=lambda _: proxy.resume(),
        )  # fmt: skip
    finally:
        await proxy.close()
