"""Our own chaos run, not timed: the refund desk with a few hundred tickets while agents, a
relay, Redis, PostgreSQL and the broker are killed -9 and restarted, and the gateway goes down.

Afterwards every valid ticket has settled (ended, or waiting for a human), the gateway's own
ledger shows no ticket paid twice, and every session replays from Kafka exactly as Postgres
recorded it, in order. The one operator step is the documented repair after a Redis crash
(`mesh outbox redrive --since`, which re-sends stored handoffs Redis may have lost).

The broker crash runs in a test of its own, because what it leaves behind depends on the
broker: the local one (Tansu on s3rver) can come back having lost or overwritten records it had
acknowledged. The relay heals what it can see by itself; whatever is still missing, replay
names precisely (never a session silently out of order), and `mesh outbox republish` repairs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

import refund_desk  # noqa: F401  (registers the desk's event types, for Mesh.publish)
from agentmesh import Mesh, devstack
from agentmesh.outbox.replay import ReplayError
from agentmesh.outbox.resend import Selection
from tests.audit_helpers import settings_from
from tests.conftest import AgentProcess, MeshProcess, eventually
from tests.refund_helpers import Desk, start_desk

TICKETS = 240
PUBLISH_S = 12.0


@pytest.fixture
def desk(
    audit_env: dict[str, str],
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
    redis: Redis,  # empty streams
    pg: asyncpg.Connection,  # empty tables
) -> Iterator[Desk]:
    d = start_desk(audit_env, agents, tmp_path, MESH_CLAIM_IDLE_MS="2000")
    yield d
    d.gateway.stop()


def _ticket(i: int, rnd: random.Random) -> dict[str, Any]:
    t: dict[str, Any] = {
        "ticket_id": f"C-{i}",
        "customer": f"c{i}@example.com",
        "order_id": f"O-{i}",
        "amount_cents": rnd.randint(500, 30_000),
        "text": rnd.choice(["arrived broken", "never arrived", "late"]),
    }
    roll = rnd.random()
    if roll < 0.06:
        t["amount_cents"] = rnd.randint(60_000, 200_000)  # waits for a human
    elif roll < 0.10:
        t["account"] = "closed"  # refused by the gateway: compensated
    return t


async def _publish_all(client: Mesh, tickets: list[dict[str, Any]]) -> None:
    """At a steady pace; a publish that meets a dead server is retried with the same
    idempotency key (the ticket's), so a retry that follows a half-done publish acts once."""
    t0 = time.monotonic()
    for i, t in enumerate(tickets):
        while True:
            try:
                await client.publish("ticket.submitted", t, session_id=f"chaos-{i}",
                                     idempotency_key=f"ticket:{t['ticket_id']}")  # fmt: skip
                break
            except Exception:  # Redis or Postgres is down right now: the producer retries
                await asyncio.sleep(0.3)
        await asyncio.sleep(max(0.0, t0 + (i + 1) * PUBLISH_S / len(tickets) - time.monotonic()))


async def _chaos_run(
    desk: Desk,
    agents: Callable[..., AgentProcess],
    relays: Callable[..., MeshProcess],
    audit_env: dict[str, str],
    stack: devstack.StackConfig,
    crashes: tuple[str, ...],
) -> tuple[Mesh, list[str], datetime]:
    """Publish the tickets while the processes of `crashes` are killed -9 and restarted, then
    wait until every ticket settled and no ticket was paid twice. Returns an open client."""
    rnd = random.Random(5)
    tickets = [_ticket(i, rnd) for i in range(TICKETS)]
    relay = [relays()]
    began = datetime.now(UTC) - timedelta(seconds=5)

    def restart(proc: AgentProcess) -> None:
        proc.kill9()
        desk.procs.remove(proc)
        desk.procs.append(agents(proc.name, **desk.extra))

    def victim(name: str) -> AgentProcess:
        return next(p for p in desk.procs if p.name == name and p.alive())

    async def crash(what: str) -> None:
        if what in ("redis", "postgres", "kafka"):
            devstack.kill9(stack, what)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(devstack.up, stack, (what,))
        elif what == "relay":
            relay[0].kill9()
            relay[0] = relays()
        elif what == "gateway":
            await desk.gateway.admin("POST", "/admin/outage", {"seconds": 3})
        else:
            restart(victim(what))

    async def chaos() -> None:
        for what in crashes:
            await asyncio.sleep(1.2)
            await crash(what)

    client = Mesh(settings_from(audit_env), operator="chaos")
    await asyncio.gather(_publish_all(client, tickets), chaos())
    # Redis may have lost its last second of writes (AOF fsyncs every second): the documented
    # repair re-sends every stored handoff; what is still on its stream is skipped.
    await client.redrive(Selection(since=began), reason="chaos test: Redis was killed")
    sessions = [f"chaos-{i}" for i in range(TICKETS)]
    unsettled: list[str] = []

    async def settled() -> bool:
        try:
            states = {s.session_id: s for s in await client.sessions(limit=5_000)}
        except Exception:  # a pooled connection that died with Postgres, once
            return False
        done = {k for k, v in states.items() if v.status in ("ended", "waiting")}
        unsettled[:] = [s for s in sessions if s not in done]
        return not unsettled

    try:
        await eventually(settled, timeout=240, interval=1, what="every ticket settled")
    except AssertionError:
        dlq = [(e.agent, e.reason, e.error[:100]) for e in await client.dlq.list()]
        raise AssertionError(
            f"{len(unsettled)} unsettled, e.g. {unsettled[:5]}; DLQ: {dlq[:10]}"
        ) from None
    paid = desk.gateway.paid()
    assert paid and set(paid.values()) == {1}, {k: v for k, v in paid.items() if v > 1}
    for proc in [*desk.procs, relay[0]]:
        assert proc.alive(), f"{proc.name} died:\n{proc.log()[-3000:]}"
    return client, sessions, began


async def _compare(client: Mesh, sessions: list[str]) -> dict[str, str]:
    """Sessions whose replay is not Postgres' outbox order, and why. A session with missing
    events must name them (`Replay.missing`), and what it has must still be in order."""
    pool = await client.pg()
    differ: dict[str, str] = {}
    for s in sessions:
        rows = await pool.fetch(
            "SELECT event_id FROM mesh_outbox WHERE session_id = $1 ORDER BY id", s
        )
        expected = [str(r["event_id"]) for r in rows]
        try:
            rep = await client.replay(s)
        except ReplayError as exc:  # mid-heal: the index and the partition disagree
            differ[s] = str(exc)
            continue
        got = [e.envelope.event_id for e in rep.events]
        if got == expected:
            continue
        assert got == [e for e in expected if e in set(got)], f"{s} replays out of order"
        named = {m.event_id for m in rep.missing}
        assert set(expected) - set(got) <= named, f"{s}: events missing and not reported"
        differ[s] = f"{len(got)} of {len(expected)}; missing named: {len(named)}"
    return differ


async def _log_matches_postgres(client: Mesh, sessions: list[str], timeout: float) -> None:
    differ: dict[str, str] = {}

    async def matches() -> bool:
        if await client.wait_published(timeout_s=5):
            return False
        differ.clear()
        differ.update(await _compare(client, sessions))
        return not differ

    try:
        await eventually(matches, timeout=timeout, interval=2, what="the audit log")
    except AssertionError:
        raise AssertionError(f"replay differs from Postgres: {list(differ.items())[:5]}") from None


async def test_kill_9_of_agents_relay_redis_and_postgres_loses_nothing_and_pays_nothing_twice(
    desk: Desk,
    agents: Callable[..., AgentProcess],
    relays: Callable[..., MeshProcess],
    audit_env: dict[str, str],
    stack: devstack.StackConfig,
) -> None:
    crashes = ("gateway", "intake", "payments", "relay", "redis", "postgres", "risk", "notifier")
    client, sessions, _ = await _chaos_run(desk, agents, relays, audit_env, stack, crashes)
    async with client:
        await _log_matches_postgres(client, sessions, timeout=90)


async def test_a_broker_crash_under_load_is_healed_or_named_and_republish_repairs_it(
    desk: Desk,
    agents: Callable[..., AgentProcess],
    relays: Callable[..., MeshProcess],
    audit_env: dict[str, str],
    stack: devstack.StackConfig,
) -> None:
    crashes = ("kafka", "payments", "relay", "kafka")
    client, sessions, began = await _chaos_run(desk, agents, relays, audit_env, stack, crashes)
    async with client:
        assert await client.wait_published(timeout_s=120) == 0, "rows never reached Kafka"
        await asyncio.sleep(5)  # the relay's own heal, where it sees a loss
        await _compare(client, sessions)  # whatever is missing is named, the rest in order
        await client.republish(Selection(since=began), reason="chaos test: broker crash")
        await _log_matches_postgres(client, sessions, timeout=90)
