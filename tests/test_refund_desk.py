"""The refund desk, every path, with its agents as processes (two payments replicas), the
gateway stand-in over HTTP, and real Redis and Postgres. Each ends in the right terminal
state with at most one payment per ticket in the gateway's own ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.conftest import AgentProcess, eventually
from tests.helpers import mesh
from tests.refund_helpers import Desk, start_desk


def ticket(
    n: int, amount: int = 2_500, text: str = "arrived broken", **kw: str
) -> dict[str, object]:
    return {"ticket_id": f"T-{n}", "customer": f"c{n}@example.com", "order_id": f"O-{n}",
            "amount_cents": amount, "text": text, **kw}  # fmt: skip


@pytest.fixture
def desk(
    base_env: dict[str, str],
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Desk]:
    marker = request.node.get_closest_marker("desk")
    kwargs = marker.kwargs if marker else {}
    d = start_desk(base_env, agents, tmp_path, **kwargs)
    yield d
    d.gateway.stop()


async def test_auto_human_approved_rejected_refused_and_over_limit(
    desk: Desk, pg: asyncpg.Connection, redis: Redis
) -> None:
    followed = await asyncio.to_thread(desk.publish, "s-auto", "--wait", **ticket(1))
    assert followed["session"]["status"] == "ended"  # --wait followed it to the end
    assert followed["session"]["outcome"] == "refunded"
    desk.publish("s-human", **ticket(2, amount=90_000))
    desk.publish("s-reject", **ticket(3, amount=90_000))
    desk.publish("s-closed", **ticket(4, account="closed"))
    desk.publish("s-limit", **ticket(5, amount=900_000))

    assert (await desk.until("s-auto", "ended"))["outcome"] == "refunded"
    human = mesh(desk.env, "publish", "refund:tickets", "-t", "ticket.submitted", "-s", "s-human2",
                 "-p", json.dumps(ticket(8, amount=90_000)), "--wait")  # fmt: skip
    assert human.returncode == 0 and "waiting · risk: approval" in human.stdout, human.stdout
    waiting = await desk.until("s-human", "waiting")
    assert waiting["step"] == "risk: approval" and waiting["deadline"]
    await desk.until("s-reject", "waiting")

    ok = await asyncio.to_thread(
        mesh, desk.env, "approve", "s-human", "--reason", "known customer", "--json"
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["decision"] == "approve"
    no_reason = await asyncio.to_thread(mesh, desk.env, "reject", "s-reject")
    assert no_reason.returncode == 2
    rej = await asyncio.to_thread(
        mesh, desk.env, "reject", "s-reject", "--reason", "duplicate claim"
    )
    assert rej.returncode == 0, rej.stderr

    assert (await desk.until("s-human", "ended"))["outcome"] == "refunded"
    rejected = await desk.until("s-reject", "ended")
    assert rejected["outcome"] == "rejected" and rejected["reason"] == "duplicate claim"
    assert (await desk.until("s-closed", "ended"))["outcome"] == "compensated"
    assert (await desk.until("s-limit", "ended"))["outcome"] == "rejected"

    again = await asyncio.to_thread(mesh, desk.env, "approve", "s-human")
    assert again.returncode == 1 and "not waiting" in again.stderr
    missing = await asyncio.to_thread(mesh, desk.env, "session", "nope", "--no-replay")
    assert missing.returncode == 1 and missing.stderr.startswith("error:")

    assert desk.gateway.paid() == {"T-1": 1, "T-2": 1}
    # the compensations: every hold placed and not paid was released
    released = {
        json.loads(r["envelope"])["payload"]["ticket_id"]
        for r in await pg.fetch("SELECT envelope FROM mesh_outbox WHERE type = 'hold.released'")
    }
    assert released == {"T-3", "T-4"}
    ops = await pg.fetch("SELECT envelope FROM mesh_outbox WHERE type = 'mesh.operator'")
    assert sorted(json.loads(r["envelope"])["payload"]["action"] for r in ops) == [
        "approve",
        "reject",
    ]
    assert await redis.xlen("mesh:dlq") == 0

    table = await asyncio.to_thread(mesh, desk.env, "sessions")
    assert table.returncode == 0 and "s-human" in table.stdout and "refunded" in table.stdout
    one = await asyncio.to_thread(mesh, desk.env, "session", "s-human", "--no-replay", "--json")
    assert one.returncode == 0 and json.loads(one.stdout)["outcome"] == "refunded"


async def test_two_operators_racing_on_one_approval_one_wins_the_other_is_told(
    desk: Desk, pg: asyncpg.Connection
) -> None:
    desk.publish("s-race", **ticket(9, amount=90_000))
    await desk.until("s-race", "waiting")
    env_a = {**desk.env, "MESH_OPERATOR": "ann"}
    env_b = {**desk.env, "MESH_OPERATOR": "bob"}
    approve, reject = await asyncio.gather(
        asyncio.to_thread(mesh, env_a, "approve", "s-race", "--json"),
        asyncio.to_thread(mesh, env_b, "reject", "s-race", "--reason", "looks fake", "--json"),
    )
    codes = sorted([approve.returncode, reject.returncode])
    assert codes == [0, 1], (approve.stdout + approve.stderr, reject.stdout + reject.stderr)
    winner = "approve" if approve.returncode == 0 else "reject"
    loser = reject if winner == "approve" else approve
    # the loser saw the step already decided, or published and was told it was skipped
    assert "not waiting" in loser.stderr or "acted on first" in loser.stderr, loser.stderr
    ended = await desk.until("s-race", "ended")
    assert ended["outcome"] == ("refunded" if winner == "approve" else "rejected")
    assert desk.gateway.paid() == ({"T-9": 1} if winner == "approve" else {})
    acted = await pg.fetch(
        "SELECT result FROM mesh_actions WHERE session_id = 's-race' AND agent = 'risk' "
        "AND input_type = 'approval.decided'"
    )
    assert len(acted) == 1  # one decision acted on, whatever the interleaving


@pytest.mark.desk(REFUND_APPROVAL_DEADLINE_S="2")
async def test_a_session_waiting_past_its_deadline_is_compensated(
    desk: Desk, pg: asyncpg.Connection
) -> None:
    desk.publish("s-late", **ticket(6, amount=90_000))
    await desk.until("s-late", "waiting")
    ended = await desk.until("s-late", "ended", timeout=30)
    assert ended["outcome"] == "expired" and "deadline" in ended["reason"]
    late = await asyncio.to_thread(mesh, desk.env, "approve", "s-late")
    assert late.returncode == 1  # too late: nothing waits any more
    assert desk.gateway.paid() == {}
    rows = await pg.fetch("SELECT type FROM mesh_outbox WHERE session_id = 's-late' ORDER BY id")
    assert "hold.released" in [r["type"] for r in rows]


async def test_gateway_outage_then_every_refund_is_paid_once(
    desk: Desk, pg: asyncpg.Connection, redis: Redis
) -> None:
    desk.publish("s-warm", **ticket(99))  # every agent is up and the path works
    await desk.until("s-warm", "ended", timeout=60)
    down = await desk.gateway.admin("POST", "/admin/outage", {"seconds": 10})
    assert down.status == 200
    sessions = [f"s-out-{i}" for i in range(12)]
    for i, s in enumerate(sessions):
        desk.publish(s, **ticket(100 + i))

    for s in sessions:
        assert (await desk.until(s, "ended", timeout=60))["outcome"] == "refunded"
    paid = desk.gateway.paid()
    assert len(paid) == 13 and set(paid.values()) == {1}
    assert await redis.xlen("mesh:dlq") == 0
    # The breaker opened during the outage (the report counts openings: with a 2 s reset it is
    # open for moments only) and is closed again now that refunds go through.
    status = await asyncio.to_thread(mesh, desk.env, "status", "--json")
    assert status.returncode == 0, status.stderr
    gateway = [b for b in json.loads(status.stdout)["breakers"] if b["agent"] == "payments"]
    assert len(gateway) == 2 and all(b["dependency"] == "gateway" for b in gateway)
    assert sum(b["opened"] for b in gateway) >= 1, gateway
    opened = [b for b in gateway if b["opened"]]
    assert all(b["last_opened_at"] for b in opened)
    human = await asyncio.to_thread(mesh, desk.env, "status")
    assert "x, last" in human.stdout, human.stdout  # "opened: 2x, last 4.1s ago"


@pytest.mark.desk(gateway_args=("--latency", "3"), MESH_CLAIM_IDLE_MS="2000")
async def test_payments_killed_mid_call_the_retry_after_restart_pays_once(
    desk: Desk, agents: Callable[..., AgentProcess], redis: Redis
) -> None:
    """kill -9 of every payments replica while the gateway is paying: the gateway finishes the
    payment nobody hears about; a new replica reclaims the entry, calls again with the same
    idempotency key, gets the first answer back, and the ticket is refunded once."""
    desk.publish("s-kill", **ticket(21))

    async def in_flight() -> bool:
        r = await desk.gateway.admin("GET", "/ledger")
        return int(r.body["calls"]) >= 1 and not r.body["refunds"]

    await eventually(in_flight, timeout=30, interval=0.05, what="the payment call in flight")
    payments = [p for p in desk.procs if p.name == "payments"]
    for p in payments:
        p.kill9()

    async def paid_by_gateway() -> bool:
        return desk.gateway.paid() == {"T-21": 1}

    await eventually(paid_by_gateway, timeout=10, what="the gateway finishing the payment")
    assert (await desk.sessions_now()).get("s-kill", {}).get("status") != "ended"
    desk.procs.append(agents("payments", **desk.extra))
    ended = await desk.until("s-kill", "ended", timeout=60)
    assert ended["outcome"] == "refunded"
    assert desk.gateway.paid() == {"T-21": 1}  # called twice, paid once
    calls = await desk.gateway.admin("GET", "/ledger")
    assert int(calls.body["calls"]) >= 2
    paid = [
        json.loads(f[b"envelope"])["payload"]
        for _, f in await redis.xrange("refund:paid")
        if json.loads(f[b"envelope"])["session_id"] == "s-kill"
    ]
    assert len(paid) == 1 and paid[0]["refund_id"] == desk.gateway.refund_ids()["T-21"]


async def test_a_ticket_delivered_twice_or_resubmitted_is_paid_once(
    desk: Desk, pg: asyncpg.Connection, redis: Redis
) -> None:
    import refund_desk  # noqa: F401
    from agentmesh.schemas import registry

    env = registry.make("ticket.submitted", ticket(31), session_id="s-dup")
    for _ in range(2):  # the same bytes twice on the stream: a producer's retry, a replay
        await redis.xadd("refund:tickets", {"envelope": env.to_json()})
    assert (await desk.until("s-dup", "ended"))["outcome"] == "refunded"
    # the customer submits the same ticket again, as a new event in a new session
    desk.publish("s-dup-again", **ticket(31))
    assert (await desk.until("s-dup-again", "ended"))["outcome"] == "refunded"
    assert desk.gateway.paid() == {"T-31": 1}
    intake = await pg.fetchval(
        "SELECT count(*) FROM mesh_actions WHERE agent = 'intake' AND session_id = 's-dup'"
    )
    assert intake == 1  # the second delivery was recognised, not handled again
    replayed = await pg.fetchval(
        "SELECT result->>'replayed' FROM mesh_actions WHERE agent = 'payments' "
        "AND session_id = 's-dup-again'"
    )
    assert replayed == "true"  # the gateway answered the second session from its first payment


# One delivery only, so the payment is dead-lettered before the breaker opens (once it is
# open, payments are parked in Redis, not failed, for as long as the outage lasts).
@pytest.mark.desk(MESH_MAX_DELIVERIES="1")
async def test_a_payment_dead_lettered_in_a_long_outage_is_retried_by_hand_and_paid_once(
    desk: Desk, pg: asyncpg.Connection, redis: Redis
) -> None:
    async def outage(seconds: float) -> None:
        r = await desk.gateway.admin("POST", "/admin/outage", {"seconds": seconds})
        assert r.status == 200

    await outage(600)
    desk.publish("s-long", **ticket(41))

    async def dead() -> list[dict[str, object]]:
        r = await asyncio.to_thread(mesh, desk.env, "dlq", "list", "--agent", "payments", "--json")
        return list(json.loads(r.stdout))

    (row,) = await eventually(dead, timeout=60, what="the payment in the DLQ")
    assert row["reason"] == "max_deliveries" and "gateway" in str(row["error"])
    # outcome unknown: not compensated, the hold stays, the session is still open
    assert (await desk.sessions_now())["s-long"]["status"] == "running"
    released = await pg.fetchval(
        "SELECT count(*) FROM mesh_outbox WHERE session_id = 's-long' AND type = 'hold.released'"
    )
    assert released == 0 and desk.gateway.paid() == {}

    # dropping it would strand the session with its hold placed: refused unless --force
    drop = await asyncio.to_thread(mesh, desk.env, "dlq", "drop", "--agent", "payments",
                                   "--reason", "clean up", "--json")  # fmt: skip
    assert drop.returncode == 1 and "still open" in drop.stdout, drop.stdout + drop.stderr
    assert len(await dead()) == 1

    await outage(0)  # the gateway is back
    again = await asyncio.to_thread(mesh, desk.env, "dlq", "retry", "--agent", "payments",
                                    "--reason", "gateway back", "--json")  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert (await desk.until("s-long", "ended"))["outcome"] == "refunded"
    assert desk.gateway.paid() == {"T-41": 1}
    assert await redis.xlen("mesh:dlq") == 0


async def test_malformed_tickets_reach_the_dlq_with_reasons(desk: Desk, redis: Redis) -> None:
    bad = mesh(
        desk.env, "publish", "refund:tickets", "-t", "ticket.submitted", "-p", '{"ticket_id": ""}'
    )
    assert bad.returncode == 2  # the CLI validates before writing
    good = json.loads(json.dumps(ticket(7)))
    import refund_desk  # noqa: F401
    from agentmesh.schemas import registry

    env = json.loads(registry.make("ticket.submitted", good, session_id="s-bad").to_json())
    env["payload"]["amount_cents"] = -1
    await redis.xadd("refund:tickets", {"envelope": json.dumps(env)})

    async def dead() -> list[dict[str, object]]:
        r = await asyncio.to_thread(mesh, desk.env, "dlq", "list", "--json")
        return list(json.loads(r.stdout))

    (row,) = await eventually(dead, timeout=30, what="DLQ entry")
    assert row["agent"] == "intake" and row["session_id"] == "s-bad" and row["reason"]
    assert desk.gateway.paid() == {}
