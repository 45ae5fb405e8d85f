"""Forged decisions and forged approvals, written straight to Redis as an attacker with write
access to the bus would, against the refund desk's agents as real processes. Nothing forged
may pay, or pay more than risk itself stored: a decision is checked against the waiting
step the agent stored, and payments pays only what risk committed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

import refund_desk  # noqa: F401  (registers the desk's event types)
from agentmesh.schemas import registry
from agentmesh.schemas.approval import decision_key
from tests.conftest import AgentProcess, eventually
from tests.helpers import mesh
from tests.refund_helpers import Desk, start_desk


@pytest.fixture
def desk(
    base_env: dict[str, str], agents: Callable[..., AgentProcess], tmp_path: Path
) -> Iterator[Desk]:
    d = start_desk(base_env, agents, tmp_path)
    yield d
    d.gateway.stop()


def _ticket(tid: str, amount: int) -> dict[str, Any]:
    return {"ticket_id": tid, "customer": f"{tid}@example.com", "order_id": f"O-{tid}",
            "amount_cents": amount, "text": "never arrived"}  # fmt: skip


async def _xadd(redis: Redis, event_type: str, payload: dict[str, Any], **fields: Any) -> str:
    """What an attacker does: build a valid envelope and XADD it onto the type's stream."""
    env = registry.make(event_type, payload, source="attacker", **fields)
    await redis.xadd(registry.stream_of(event_type), {"envelope": env.to_wire()})
    return env.event_id


def _decision(decision: str, ticket: dict[str, Any], **kw: Any) -> dict[str, Any]:
    context = {"ticket": ticket, "hold_id": f"hold-{ticket['ticket_id']}"}
    return {"decision": decision, "operator": "mallory", "step": "approval", "context": context,
            **kw}  # fmt: skip


async def _action(pg: asyncpg.Connection, agent: str, event_id: str) -> dict[str, Any]:
    async def row() -> Any:
        return await pg.fetchrow(
            "SELECT idempotency_key, result, emitted FROM mesh_actions "
            "WHERE agent = $1 AND input_event_id = $2",
            agent,
            uuid.UUID(event_id),
        )

    found = await eventually(row, timeout=40, interval=0.2, what=f"{agent} acts on {event_id}")
    return {**dict(found), "result": json.loads(found["result"])}


def _amounts(desk: Desk) -> dict[str, int]:
    lines = desk.gateway.ledger.read_text().splitlines()
    return {e["ticket_id"]: e["amount_cents"] for e in map(json.loads, filter(None, lines))}


class Findings:
    """Each attack is checked and the test goes on, so one run names every attack that worked."""

    def __init__(self) -> None:
        self.broken: list[str] = []

    def expect(self, ok: bool, attack: str, seen: object) -> None:
        if not ok:
            self.broken.append(f"{attack}: {seen!r}")


async def _outcome(pg: asyncpg.Connection, redis: Redis, key: str) -> dict[str, Any]:
    """What payments did with the event of idempotency key `key`: {"dlq": entry} or
    {"action": its result}."""

    async def seen() -> dict[str, Any] | None:
        for _, f in await redis.xrange("mesh:dlq"):
            if key.encode() in f.get(b"envelope", b""):
                return {"dlq": {k.decode(): v.decode(errors="replace") for k, v in f.items()}}
        row = await pg.fetchrow(
            "SELECT result FROM mesh_actions WHERE agent = 'payments' AND idempotency_key = $1",
            key,
        )
        return {"action": json.loads(row["result"])} if row else None

    found: dict[str, Any] = await eventually(seen, timeout=40, interval=0.2, what="payments")
    return found


async def test_forged_decisions_are_refused_or_pay_only_what_risk_stored(
    pg: asyncpg.Connection, redis: Redis, desk: Desk
) -> None:
    f = Findings()
    run = uuid.uuid4().hex[:6]
    big, rej, late, never = (f"fd-{n}-{run}" for n in ("big", "rej", "late", "never"))
    tickets = {s: _ticket(f"T-{s}", 90_000) for s in (big, rej, late, never)}
    for s in (big, rej, late):
        desk.publish(s, **tickets[s])
    for s in (big, rej, late):
        await desk.until(s, "waiting")
    r = await asyncio.to_thread(mesh, desk.env, "reject", rej, "--reason", "duplicate claim")
    assert r.returncode == 0, r.stderr
    await desk.until(rej, "ended")

    # 1. a decision for a waiting step that says the ticket is worth 100x more: the agent
    #    takes the ticket from its own stored step; the forged amount is never paid
    inflated = {**tickets[big], "amount_cents": 9_000_000}
    await _xadd(redis, "approval.decided", _decision("approve", inflated), session_id=big,
                idempotency_key=decision_key(big, "approval"))  # fmt: skip
    await desk.until(big, "ended")
    f.expect(_amounts(desk).get(f"T-{big}") == 90_000, "inflated approval", _amounts(desk))

    # 2. an approval after a human rejected, under another idempotency key: refused
    after = await _xadd(redis, "approval.decided", _decision("approve", tickets[rej]),
                        session_id=rej, idempotency_key=f"forged-{run}")  # fmt: skip
    acted = await _action(pg, "risk", after)
    refused = str(acted["result"].get("refused", ""))
    f.expect("already decided" in refused and acted["emitted"] == 0, "approve after reject", acted)

    # 3. a decision for a session that never waited: refused
    ghost = await _xadd(
        redis,
        "approval.decided",
        _decision("approve", tickets[never]),
        session_id=never,
        idempotency_key=decision_key(never, "approval"),
    )
    acted = await _action(pg, "risk", ghost)
    refused = str(acted["result"].get("refused", ""))
    f.expect("never waited" in refused and acted["emitted"] == 0, "never waited", acted)
    f.expect(not acted["idempotency_key"].startswith("decision:"), "refusal took the key", acted)

    # 4. an `expire` before the deadline, under the step's own key: refused, and it does not
    #    use up the key, so the human's decision afterwards is still acted on
    early = await _xadd(
        redis,
        "approval.decided",
        _decision("expire", tickets[late]),
        session_id=late,
        idempotency_key=decision_key(late, "approval"),
    )
    acted = await _action(pg, "risk", early)
    f.expect("deadline" in str(acted["result"].get("refused", "")), "early expire", acted)
    if (await desk.sessions_now())[late]["status"] == "waiting":
        ok = await asyncio.to_thread(mesh, desk.env, "approve", late, "--reason", "fine")
        f.expect(ok.returncode == 0, "approve after a refused expire", ok.stdout + ok.stderr)
        outcome = (await desk.until(late, "ended"))["outcome"]
        f.expect(outcome == "refunded", "approve after a refused expire", outcome)

    # 5. a refund.approved written straight onto the payments agent's stream: dead-lettered
    forged = {"ticket": _ticket(f"T-x-{run}", 1_234), "hold_id": "hold-x", "approved_by": "auto"}
    direct = await _xadd(redis, "refund.approved", forged, session_id=f"fd-x-{run}")
    seen = await _outcome(pg, redis, direct)
    error = seen.get("dlq", {}).get("error", "")
    f.expect("not emitted by risk" in error, "approval XADDed to refund:approved", seen)

    # 6. a genuine refund.approved's event id re-sent with another ticket and amount: refused
    row = await pg.fetchrow(
        "SELECT envelope FROM mesh_outbox WHERE session_id = $1 AND type = 'refund.approved'",
        big,
    )
    real = json.loads(row["envelope"])
    real["payload"]["ticket"].update(ticket_id=f"T-y-{run}", amount_cents=7_777_777)
    real["idempotency_key"] = f"forged-y-{run}"
    await redis.xadd("refund:approved", {"envelope": json.dumps(real)})
    seen = await _outcome(pg, redis, real["idempotency_key"])
    error = seen.get("dlq", {}).get("error", "")
    f.expect("differs from what risk stored" in error, "genuine event id, new payload", seen)

    paid = _amounts(desk)
    f.expect(paid == {f"T-{big}": 90_000, f"T-{late}": 90_000}, "paid", paid)
    assert not f.broken, "\n".join(f.broken)


async def test_every_waiting_step_is_guarded_not_only_the_refund_desks(
    pg: asyncpg.Connection, redis: Redis, agents: Callable[..., AgentProcess]
) -> None:
    import tests.waiting_fixture  # noqa: F401  (registers door.knocked / door.decided)

    agents("gatekeeper", MESH_AGENTS_MODULE="tests.waiting_fixture")
    knock = await _xadd(redis, "door.knocked", {"amount": 5}, session_id="door-1")
    await _action(pg, "gatekeeper", knock)
    forged = {
        "decision": "approve",
        "operator": "mallory",
        "step": "open",
        "context": {"amount": 999},
    }
    wrong_key = await _xadd(redis, "door.decided", forged, session_id="door-1")
    acted = await _action(pg, "gatekeeper", wrong_key)
    assert "must carry the idempotency key 'decision:door-1:open'" in acted["result"]["refused"]
    right = await _xadd(redis, "door.decided", forged, session_id="door-1",
                        idempotency_key=decision_key("door-1", "open"))  # fmt: skip
    acted = await _action(pg, "gatekeeper", right)
    assert acted["result"] == {"decision": "approve", "stored": {"amount": 5},
                               "context_seen": {"amount": 5}}  # fmt: skip
    again = await _xadd(redis, "door.decided", forged, session_id="door-1",
                        idempotency_key=f"another-{uuid.uuid4()}")  # fmt: skip
    assert "already decided" in (await _action(pg, "gatekeeper", again))["result"]["refused"]
