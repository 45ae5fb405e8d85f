"""Shared rate budgets: the token bucket in Redis (bus/lua/budget.lua), a dependency's calls
through it (agents/resilience.py), the read gate, and ten real agent processes sharing one
budget against the gateway stand-in."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

from agentmesh import Agent, Budget, DependencySpec, Mesh, Settings
from agentmesh.agents.resilience import BudgetExhausted, Dependency
from agentmesh.agents.runner import Runner
from agentmesh.bus.budget import Buckets, budget_key
from agentmesh.client import NewEvent
from agentmesh.devstack import free_port
from agentmesh.schemas.registry import Registry
from tests.audit_helpers import settings_from
from tests.conftest import AgentProcess, eventually
from tests.helpers import actions, mesh
from tests.refund_helpers import Gateway

RATE, BURST, SECONDS, REPLICAS, TICKETS = 50, 25, 10, 10, 600


# -- the bucket ------------------------------------------------------------------------------
async def test_bucket_grants_the_burst_then_turns_then_refuses(redis: Redis) -> None:
    b = Buckets(redis)
    takes = [
        await b.take("llm", rate_per_s=0.1, burst=3, amount=1, max_wait_s=25) for _ in range(6)
    ]
    assert [t.granted for t in takes] == [True] * 5 + [False]
    # three at once, then a turn one refill (10 s) apart each, as long as it is within 25 s
    assert [round(t.wait_s / 10) for t in takes[:5]] == [0, 0, 0, 1, 2]
    assert 0 < takes[5].wait_s <= 5  # refused: room again once a 25 s wait is enough
    st = await b.state("llm")
    assert st is not None
    assert (st.granted, st.refused, st.exhausted) == (5, 1, 1)
    assert (st.rate_per_s, st.burst) == (0.1, 3.0) and st.tokens < -1.9
    assert 0 < st.since <= await _server_time(redis)  # created by the server's clock

    # refilled (as if time passed): the next drain is a second exhaustion, not the same one
    await redis.hset(budget_key("llm"), "tokens", "3")
    assert (await b.take("llm", rate_per_s=0.1, burst=3, amount=3, max_wait_s=0)).granted
    assert not (await b.take("llm", rate_per_s=0.1, burst=3, amount=1, max_wait_s=0)).granted
    st = await b.state("llm")
    assert st is not None and st.exhausted == 2
    assert [s.name for s in await b.states()] == ["llm"]
    assert await b.state("nothing") is None


async def test_a_forged_bucket_resets_instead_of_failing_or_granting_everything(
    redis: Redis,
) -> None:
    b = Buckets(redis)
    forged = {"tokens": "nan", "ts": "inf", "rate": "x", "granted": "lots", "exhausted": "-inf"}
    await redis.hset(budget_key("gw"), mapping=forged)
    first = await b.take("gw", rate_per_s=1.0, burst=1, amount=1, max_wait_s=0)
    second = await b.take("gw", rate_per_s=1.0, burst=1, amount=1, max_wait_s=0)
    assert first.granted and not second.granted  # a full bucket of one, then empty
    st = await b.state("gw")
    assert st is not None and (st.granted, st.refused, st.exhausted) == (1, 1, 1)


async def test_a_call_waits_its_turn_when_the_bucket_refills_in_time(redis: Redis) -> None:
    dep = Dependency(DependencySpec(name="api", budget=Budget(rate=1, burst=1, max_wait_s=5)))
    dep.attach(Buckets(redis))

    async def ping() -> str:
        return "pong"

    assert [await dep.call(ping) for _ in range(2)] == ["pong"] * 2  # none refused
    assert dep.budget_waited == 1 and dep.budget_refused == 0 and not dep.budget_empty
    st = await Buckets(redis).state("api")
    assert st is not None and (st.granted, st.refused) == (2, 0)
    for bad in ({"rate": 0}, {"rate": 1, "per_s": 0}, {"rate": 1, "burst": 0.5}):
        with pytest.raises(ValueError):
            Budget(**bad)


async def test_cost_is_charged_after_the_call_from_its_result(redis: Redis) -> None:
    budget = Budget(rate=3600, per_s=3600, burst=1000, reserve=100, cost=lambda r: r["tokens"])
    dep = Dependency(DependencySpec(name="llm", budget=budget))
    dep.attach(Buckets(redis))

    async def complete() -> dict[str, int]:
        return {"tokens": 700}

    assert await dep.call(complete) == {"tokens": 700}
    st = await Buckets(redis).state("llm")
    assert st is not None and st.rate_per_s == 1.0
    assert 300 <= st.tokens < 330  # 1000 - 700 charged in all, plus what refilled since (1/s)
    assert dep.budget_tokens is not None and dep.budget_tokens < 330

    async def broken() -> dict[str, str]:
        return {"tokens": "many"}  # a cost the function cannot compute: the call still counts

    assert await dep.call(broken) == {"tokens": "many"}
    st = await Buckets(redis).state("llm")
    assert st is not None and st.granted == 2 and 200 <= st.tokens < 230  # the reserve only


async def test_an_empty_budget_is_no_failure_of_the_dependency(redis: Redis) -> None:
    spec = DependencySpec(name="gw", fail_max=1, budget=Budget(rate=1, burst=1, max_wait_s=0))
    first, second = Dependency(spec), Dependency(spec)  # two replicas, one bucket
    first.attach(Buckets(redis))
    second.attach(Buckets(redis))
    calls = 0

    async def pay() -> str:
        nonlocal calls
        calls += 1
        return "paid"

    assert await first.call(pay) == "paid"
    for dep in (second, first):
        with pytest.raises(BudgetExhausted) as raised:
            await dep.call(pay)
        assert 0 < raised.value.retry_after_s <= 1.2
    assert calls == 1  # no retry of a call the budget refused
    assert first.state == second.state == "closed"  # the breaker counted nothing
    assert first.budget_empty and second.budget_empty and first.budget_refused == 1

    unattached = Dependency(spec)
    with pytest.raises(RuntimeError, match="no Redis"):
        await unattached.call(pay)


class _Ask(BaseModel):
    n: int


async def test_the_reader_stops_streams_that_lead_only_to_an_empty_budget() -> None:
    reg = Registry()
    reg.register("ask.llm", _Ask, stream="g:llm")
    reg.register("ask.mixed", _Ask, stream="g:mixed")
    reg.register("ask.plain", _Ask, stream="g:mixed")
    agent = Agent(
        "gated",
        registry=reg,
        dependencies=[DependencySpec(name="llm", budget=Budget(rate=1))],
    )

    async def handle(_: _Ask, ctx: Any) -> None:
        return None

    agent.handler("ask.llm", needs=["llm"])(handle)
    agent.handler("ask.mixed", needs=["llm"])(handle)
    agent.handler("ask.plain")(handle)  # needs nothing: its stream must still be read
    runner = Runner(agent, Settings())
    assert runner.paused_streams() == (set(), set())
    runner.dependencies["llm"].gate_until = float("inf")
    assert runner.stream_modes() == (["g:mixed"], [])  # no new entries from g:llm
    assert runner.paused_streams() == (set(), set())  # its parked entries still run when due


# -- ten replicas, one budget, the gateway stand-in ------------------------------------------
def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())
    except OSError:
        return ""


async def _server_time(redis: Redis) -> float:
    sec, usec = await redis.time()
    return float(sec) + usec / 1e6


def _approved(n: int) -> NewEvent:
    ticket = {"ticket_id": f"T-{n}", "customer": f"c{n}@example.com", "order_id": f"O-{n}",
              "amount_cents": 1000 + n}  # fmt: skip
    return NewEvent(
        event_type="refund.approved",
        payload={"ticket": ticket, "hold_id": f"hold-T-{n}", "approved_by": "auto"},
        session_id=f"b-{n}",
    )


async def test_ten_replicas_share_one_budget_of_the_gateway(
    base_env: dict[str, str],
    agents: Callable[..., AgentProcess],
    redis: Redis,
    pg: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    import refund_desk.events  # noqa: F401  (registers the desk's event types)

    gw = Gateway.start(tmp_path)
    env = {**base_env, "MESH_AGENTS_MODULE": "refund_desk",
           "REFUND_GATEWAY_URL": f"http://127.0.0.1:{gw.port}",
           "REFUND_GATEWAY_RATE": str(RATE), "REFUND_GATEWAY_BURST": str(BURST)}  # fmt: skip
    ports = [free_port() for _ in range(REPLICAS)]
    extra = {k: v for k, v in env.items() if base_env.get(k) != v}
    try:
        procs = [agents("payments", MESH_HTTP_PORT=str(port), **extra) for port in ports]
        seen: list[str] = []

        async def all_ready() -> list[str] | None:
            for proc in procs:  # one that died (a port taken meanwhile, say) fails at once
                assert proc.alive(), f"a payments replica exited:\n{proc.log()[-4000:]}"
            seen[:] = await asyncio.gather(
                *(asyncio.to_thread(_get, f"http://127.0.0.1:{p}/readyz") for p in ports)
            )
            return seen if all(b.startswith("ready") for b in seen) else None

        try:
            await eventually(all_ready, timeout=180, interval=0.5, what="replicas ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; /readyz answered {seen}") from None
        await redis.delete(budget_key("gateway"))
        async with Mesh(settings_from(env)) as client:
            # written as risk's own (the outbox row's agent is the source): payments pays only
            # an approval risk committed
            approvals = [_approved(n) for n in range(TICKETS)]
            sent = await client.publish_batch(approvals, source="risk")
        assert len(sent) == TICKETS

        paused_seen = False

        async def all_paid() -> bool:
            nonlocal paused_seen
            if not paused_seen:  # the read gate closes while the bucket is empty
                bodies = await asyncio.gather(
                    *(asyncio.to_thread(_get, f"http://127.0.0.1:{p}/readyz") for p in ports)
                )
                paused_seen = any("paused: refund:approved" in b for b in bodies)
            assert await redis.xlen("mesh:dlq") == 0, "a parked entry must not be dead-lettered"
            return await actions(pg, "payments") >= TICKETS

        await eventually(all_paid, timeout=120, interval=0.3, what="every ticket paid")
        answer = await gw.admin("GET", "/ledger")
        assert answer.status == 200, answer
        calls = answer.body
        t_end = await _server_time(redis)  # after the stand-in counted its calls
    finally:
        gw.stop()

    bucket = await Buckets(redis).state("gateway")
    assert bucket is not None
    t0 = bucket.since  # the bucket's first take created it, full: no call granted before
    ledger = [json.loads(line) for line in gw.ledger.read_text().splitlines() if line.strip()]
    paid = Counter(e["ticket_id"] for e in ledger)
    assert len(paid) == TICKETS and set(paid.values()) == {1}, "every ticket paid once"
    in_window = sum(1 for e in ledger if e["paid_at"] <= t0 + SECONDS)
    assert in_window <= RATE * SECONDS + BURST, f"{in_window} calls in the first {SECONDS} s"
    # every call the stand-in answered (replays of a paid key too) was granted by the bucket
    assert calls["calls"] <= BURST + RATE * (t_end - t0), (calls["calls"], t_end - t0)
    assert await redis.xlen("mesh:dlq") == 0, "a parked entry must not be dead-lettered"
    assert await actions(pg, "payments") == TICKETS
    assert bucket.exhausted >= 1 and bucket.refused >= 1
    assert paused_seen, "no replica stopped reading while the budget was empty"
    metrics = await asyncio.gather(
        *(asyncio.to_thread(_get, f"http://127.0.0.1:{p}/metrics") for p in ports)
    )
    assert any('mesh_budget_exhausted_total{agent="payments",dependency="gateway"}' in m
               for m in metrics)  # fmt: skip
    status = await asyncio.to_thread(mesh, env, "status", "--json")
    assert status.returncode == 0, status.stderr
    (shown,) = json.loads(status.stdout)["budgets"]
    assert shown["name"] == "gateway" and shown["rate_per_s"] == RATE and shown["burst"] == BURST
    assert shown["granted"] >= TICKETS and shown["exhausted"] >= 1
    table = await asyncio.to_thread(mesh, env, "status")
    assert "gateway" in table.stdout and "50/s" in table.stdout, table.stdout
