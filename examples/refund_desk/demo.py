"""`mesh demo`: the refund desk end to end on the local stack, as a newcomer first sees it.

Every agent is its own process (two payments replicas), the relay runs, and tickets flow in
for a few seconds, some malformed; partway through, the payment gateway stand-in goes down
for a few seconds, so the payments breaker opens and the desk recovers by itself. It ends
with what happened to the tickets, the DLQ with reasons, figures scraped from the agents'
own /metrics and the gateway's own ledger, and one session replayed from Kafka.

With `keep`, the whole desk (agents, relay, gateway stand-in, servers) stays up, so the
operator commands can be tried on it; `mesh dev down` stops all of it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import refund_desk  # noqa: F401  (registers the refund desk's event types)
from agentmesh import Mesh, Settings, devstack
from agentmesh.outbox.migrate import migrate
from agentmesh.schemas.ids import new_event_id
from planner_writer.demo import replay_one
from refund_desk.desk import Desk, start_desk, wait_ready
from refund_desk.gateway_standin import paid_twice, read_ledger
from refund_desk.report import next_steps, one_session, read_model, summary

SETTLE_TIMEOUT_S = 90.0


@dataclass(kw_only=True)
class DemoPlan:
    """How the run goes: ticket count and pace, and the gateway outage within it."""

    tickets: int = 300
    publish_s: float = 8.0  # tickets flow in over this long
    outage_at_s: float = 2.0  # after the first ticket
    outage_s: float = 4.0
    seed: int = 7


@dataclass
class RefundDemoResult:
    tickets: int
    malformed: int
    outcomes: dict[str, int] = field(default_factory=dict)
    waiting: int = 0
    dlq: int = 0
    double_payments: int = 0
    breaker_openings: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        settled = sum(self.outcomes.values()) + self.waiting
        return (settled == self.tickets - self.malformed and self.dlq == self.malformed
                and self.double_payments == 0)  # fmt: skip


@dataclass(frozen=True)
class DemoTicket:
    session: str
    payload: dict[str, Any]
    malformed: bool


def make_tickets(n: int, seed: int = 7) -> list[DemoTicket]:
    """About 84% pay automatically; the rest need a human, hit a closed account, are over the
    desk's limit, or are malformed (as an external web form might send them)."""
    rnd = random.Random(seed)
    run = f"{int(time.time()) % 100000:05d}"
    texts = ["arrived broken", "never arrived", "delivered late", "wrong size", "changed my mind"]
    out: list[DemoTicket] = []
    for i in range(n):
        roll = rnd.random()
        t: dict[str, Any] = {
            "ticket_id": f"T{run}-{i}", "customer": f"customer{i}@example.com",
            "order_id": f"O-{i}", "amount_cents": rnd.randint(500, 30_000),
            "text": rnd.choice(texts),
        }  # fmt: skip
        bad = roll < 0.04
        if bad:  # the amount typed as text, the order id left out
            t["amount_cents"] = f"{t['amount_cents'] // 100} euros"
            del t["order_id"]
        elif roll < 0.09:
            t["amount_cents"] = rnd.randint(60_000, 200_000)  # a human must approve
        elif roll < 0.13:
            t["account"] = "closed"  # the gateway refuses: compensation
        elif roll < 0.16:
            t["amount_cents"] = 900_000  # over the desk's limit: rejected by intake
        out.append(DemoTicket(f"refund-{run}-{i}", t, bad))
    return out


def run_refund_demo(
    s: Settings,
    cfg: devstack.StackConfig,
    *,
    plan: DemoPlan,
    keep: bool,
    console: Console,
) -> RefundDemoResult:
    started = time.monotonic()
    with console.status("starting Redis, PostgreSQL and the Kafka-compatible broker…"):
        devstack.up(cfg)
        asyncio.run(migrate(s))
    console.print(f"[green]✓[/] local stack up in {cfg.root}")
    try:
        with console.status("starting the refund desk: 5 agent processes, relay, gateway…"):
            desk = start_desk(s, cfg)
            asyncio.run(wait_ready(desk, cfg))
        console.print(
            "[green]✓[/] intake, risk, two payments replicas, notifier and the relay run as "
            "processes, beside the payment gateway [bold]stand-in[/]; logs in " + str(cfg.logs_dir)
        )
        batch = make_tickets(plan.tickets, plan.seed)
        result = asyncio.run(_run(s, desk, batch, plan, console))
        result.elapsed_s = time.monotonic() - started
        prefix = batch[0].session.rsplit("-", 1)[0] + "-"  # this run's sessions
        asyncio.run(summary(s, desk, result, prefix, console))
        asyncio.run(read_model(s, console))
        session = asyncio.run(one_session(s, prefix, console))
        if session:
            asyncio.run(replay_one(s, session, console))
        if keep:
            asyncio.run(next_steps(s, prefix, console))
    finally:
        if not keep:
            devstack.background.stop(cfg)
            devstack.down(cfg)
            console.print("[green]✓[/] agents, relay, gateway and local stack stopped "
                          "(data kept in " + str(cfg.root) + ")")  # fmt: skip
    result.elapsed_s = time.monotonic() - started
    return result


async def _run(
    s: Settings, desk: Desk, batch: list[DemoTicket], plan: DemoPlan, console: Console
) -> RefundDemoResult:
    """Publish the tickets at a steady pace, start the outage partway, follow until settled."""
    async with Mesh(s, operator="demo") as mesh:
        return await _follow(mesh, desk, batch, plan, console)


async def _follow(
    mesh: Mesh, desk: Desk, batch: list[DemoTicket], plan: DemoPlan, console: Console
) -> RefundDemoResult:
    result = RefundDemoResult(tickets=len(batch), malformed=sum(t.malformed for t in batch))
    valid = result.tickets - result.malformed
    mine = {t.session for t in batch}
    published = 0
    outage = "due"
    dlq_before = await mesh.dlq.depth()  # an earlier run's entries are not ours

    async def publisher() -> None:
        nonlocal published, outage
        t0 = time.monotonic()
        waves = max(1, int(plan.publish_s / 0.2))
        for w in range(waves):
            for t in batch[w * len(batch) // waves : (w + 1) * len(batch) // waves]:
                await _publish_one(mesh, t)
                published += 1
            if outage == "due" and time.monotonic() - t0 >= plan.outage_at_s:
                body = {"seconds": plan.outage_s}
                reply = await desk.gateway_admin("POST", "/admin/outage", body)
                outage = "on" if reply.status == 200 else "failed to start"
                asyncio.get_running_loop().call_later(plan.outage_s, _outage_over)
            await asyncio.sleep(max(0.0, t0 + (w + 1) * 0.2 - time.monotonic()))

    def _outage_over() -> None:
        nonlocal outage
        outage = "over"

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    pub_task = asyncio.create_task(publisher())
    try:
        deadline = time.monotonic() + plan.publish_s + SETTLE_TIMEOUT_S
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("tickets settled", total=valid)
            while True:
                rows = [r for r in await mesh.sessions(limit=len(batch) + 50)
                        if r.session_id in mine]  # fmt: skip
                status = Counter(r.status for r in rows)
                outcomes = Counter(r.outcome for r in rows if r.outcome)
                dlq = await mesh.dlq.depth() - dlq_before
                settled = status["ended"] + status["waiting"]
                gw = {"due": "", "on": " · [red]gateway DOWN[/]", "over": " · gateway back"}.get(
                    outage, f" · outage {outage}"
                )
                bar.update(task, completed=settled, description=(
                    f"published {published}/{len(batch)} · refunded {outcomes['refunded']} · "
                    f"waiting {status['waiting']} · DLQ {dlq}{gw}"))  # fmt: skip
                done = pub_task.done() and settled >= valid and dlq >= result.malformed
                if done or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        await pub_task
        result.outcomes = dict(outcomes)
        result.waiting = status["waiting"]
        result.dlq = dlq
        await _drain_relay(mesh, console)
        result.double_payments = len(paid_twice(read_ledger(desk.ledger)))
        return result
    finally:
        if not pub_task.done():
            pub_task.cancel()


async def _publish_one(mesh: Mesh, t: DemoTicket) -> None:
    """A valid ticket goes through `Mesh.publish` (outbox first: its first event is in the
    audit log); a malformed one is XADDed raw, as a producer that skips validation would."""
    if not t.malformed:
        await mesh.publish("ticket.submitted", t.payload, session_id=t.session, source="demo")
        return
    raw = {"event_id": new_event_id(), "session_id": t.session, "type": "ticket.submitted",
           "source": "web-form", "payload": t.payload}  # fmt: skip
    await mesh.redis.xadd("refund:tickets", {"envelope": json.dumps(raw)})


async def _drain_relay(mesh: Mesh, console: Console, within_s: float = 30) -> None:
    """Wait until the relay has put every outbox row into Kafka: the audit log is complete."""
    columns = (TextColumn("audit log: outbox rows relayed to Kafka"), BarColumn(),
               MofNCompleteColumn())  # fmt: skip
    total = await mesh.unpublished()
    deadline = time.monotonic() + within_s
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("relay", total=total)
        while time.monotonic() < deadline:
            left = await mesh.unpublished()
            bar.update(task, completed=total - left)
            if not left:
                return
            await asyncio.sleep(0.2)
