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
import os
import random
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import refund_desk  # noqa: F401  (registers the refund desk's event types)
from agentmesh import devstack, localprocs
from agentmesh.bus import Streams
from agentmesh.outbox.migrate import migrate
from agentmesh.outbox.publish import publish_events
from agentmesh.schemas import registry
from agentmesh.schemas.ids import new_event_id
from agentmesh.settings import Settings
from planner_writer.demo import _replay_one
from refund_desk.gateway_standin import paid_twice, read_ledger, request_json

MODULE = "refund_desk"
AGENTS = ("intake", "risk", "payments", "payments", "notifier")
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


def _agent_env(s: Settings, gateway_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "MESH_REDIS_URL": s.redis_url,
        "MESH_POSTGRES_DSN": s.postgres_dsn,
        "MESH_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "MESH_AUDIT_TOPIC": s.audit_topic,
        "MESH_AGENTS_MODULE": MODULE,
        "MESH_LOG_FORMAT": "json",
        "MESH_CLAIM_IDLE_MS": "2000",
        "REFUND_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
    }


@dataclass
class Desk:
    """The processes of one demo run, and where to reach them."""

    gateway_port: int
    ledger: Path
    metrics_ports: dict[str, int] = field(default_factory=dict)  # process name -> /metrics


def start_desk(s: Settings, cfg: devstack.StackConfig) -> Desk:
    """The gateway stand-in, five agent processes and the relay, each its own process."""
    localprocs.stop(cfg)  # a desk an earlier `mesh demo --keep` left running
    ledger = cfg.root / "gateway-ledger.jsonl"
    ledger.write_text("")
    desk = Desk(gateway_port=devstack.free_port(), ledger=ledger)
    gateway = [sys.executable, "-m", f"{MODULE}.gateway_standin", "--port",
               str(desk.gateway_port), "--ledger", str(ledger), "--latency", "0.005"]  # fmt: skip
    localprocs.start(cfg, "gateway-standin", gateway, dict(os.environ))
    env = _agent_env(s, desk.gateway_port)
    seen: Counter[str] = Counter()
    names = []
    for n in AGENTS:
        seen[n] += 1
        names.append(f"agent-{n}-{seen[n]}" if AGENTS.count(n) > 1 else f"agent-{n}")
    for name, agent in zip(names, AGENTS, strict=True):
        port = devstack.free_port()
        desk.metrics_ports[name] = port
        localprocs.start(
            cfg,
            name,
            [sys.executable, "-m", "agentmesh", "agent", "run", agent, "--http-port", str(port)],
            env,
        )
    port = devstack.free_port()
    desk.metrics_ports["relay"] = port
    localprocs.start(
        cfg, "relay", [sys.executable, "-m", "agentmesh", "relay", "run", "--http-port", str(port)],
        env,
    )  # fmt: skip
    return desk


def _http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status), r.read().decode()
    except OSError as exc:
        code = getattr(exc, "code", 0)
        return int(code) if isinstance(code, int) else 0, ""


async def wait_ready(desk: Desk, cfg: devstack.StackConfig, within_s: float = 60) -> None:
    """Every process answers /readyz (agents: Redis and Postgres reachable, groups made)."""
    deadline = time.monotonic() + within_s
    waiting = dict(desk.metrics_ports)
    while waiting:
        for name, port in list(waiting.items()):
            code, _ = await asyncio.to_thread(_http_get, port, "/readyz")
            if code == 200:
                del waiting[name]
        gw_up = devstack._tcp_open("127.0.0.1", desk.gateway_port)
        if not waiting and gw_up:
            return
        if time.monotonic() > deadline:
            late = ", ".join(sorted(waiting)) or "gateway-standin"
            raise devstack.StackError(f"not ready after {within_s:.0f} s: {late} (logs in "
                                      f"{cfg.logs_dir})")  # fmt: skip
        await asyncio.sleep(0.2)


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
        asyncio.run(migrate(s.postgres_dsn))
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
        asyncio.run(_summary(s, desk, result, prefix, console))
        session = asyncio.run(_one_session(s, prefix, console))
        if session:
            asyncio.run(_replay_one(s, session, console))
        if keep:
            asyncio.run(_next_steps(s, prefix, console))
    finally:
        if not keep:
            localprocs.stop(cfg)
            devstack.down(cfg)
            console.print("[green]✓[/] agents, relay, gateway and local stack stopped "
                          "(data kept in " + str(cfg.root) + ")")  # fmt: skip
    result.elapsed_s = time.monotonic() - started
    return result


async def _run(
    s: Settings, desk: Desk, batch: list[DemoTicket], plan: DemoPlan, console: Console
) -> RefundDemoResult:
    """Publish the tickets at a steady pace, start the outage partway, follow until settled."""
    from agentmesh.outbox.sessions import sessions

    redis = Redis.from_url(s.redis_url)
    conn = await asyncpg.connect(s.postgres_dsn)
    result = RefundDemoResult(tickets=len(batch), malformed=sum(t.malformed for t in batch))
    valid = result.tickets - result.malformed
    mine = {t.session for t in batch}
    published = 0
    outage = "due"
    dlq_before = int(await redis.xlen(s.dlq_stream))  # an earlier run's entries are not ours

    async def publisher() -> None:
        nonlocal published, outage
        bus = Streams(redis, group="-", consumer="-", dedup_ttl_s=s.dedup_ttl_s)
        pub = await asyncpg.connect(s.postgres_dsn)
        t0 = time.monotonic()
        waves = max(1, int(plan.publish_s / 0.2))
        try:
            for w in range(waves):
                for t in batch[w * len(batch) // waves : (w + 1) * len(batch) // waves]:
                    await _publish_one(pub, bus, redis, t)
                    published += 1
                if outage == "due" and time.monotonic() - t0 >= plan.outage_at_s:
                    body = {"seconds": plan.outage_s}
                    reply = await request_json(
                        "127.0.0.1", desk.gateway_port, "POST", "/admin/outage", body=body
                    )
                    outage = "on" if reply.status == 200 else "failed to start"
                    asyncio.get_running_loop().call_later(plan.outage_s, _outage_over)
                await asyncio.sleep(max(0.0, t0 + (w + 1) * 0.2 - time.monotonic()))
        finally:
            await pub.close()

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
                rows = [r for r in await sessions(conn, limit=len(batch) + 50)
                        if r["session_id"] in mine]  # fmt: skip
                status = Counter(r["status"] for r in rows)
                outcomes = Counter(r["outcome"] for r in rows if r["outcome"])
                dlq = int(await redis.xlen(s.dlq_stream)) - dlq_before
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
        await _drain_relay(conn, console)
        result.double_payments = len(paid_twice(read_ledger(desk.ledger)))
        return result
    finally:
        if not pub_task.done():
            pub_task.cancel()
        await conn.close()
        await redis.aclose()


async def _publish_one(conn: Any, bus: Streams, redis: Redis, t: DemoTicket) -> None:
    """A valid ticket goes through the outbox (its first event is in the audit log); a
    malformed one is XADDed raw, as a producer that skips validation would."""
    if not t.malformed:
        env = registry.make("ticket.submitted", t.payload, session_id=t.session, source="demo")
        await publish_events(conn, bus, [("refund:tickets", env)])
        return
    raw = {"event_id": new_event_id(), "session_id": t.session, "type": "ticket.submitted",
           "source": "web-form", "payload": t.payload}  # fmt: skip
    await redis.xadd("refund:tickets", {"envelope": json.dumps(raw)})


async def _drain_relay(conn: Any, console: Console, within_s: float = 30) -> None:
    """Wait until the relay has put every outbox row into Kafka: the audit log is complete."""
    columns = (TextColumn("audit log: outbox rows relayed to Kafka"), BarColumn(),
               MofNCompleteColumn())  # fmt: skip
    total = await conn.fetchval("SELECT count(*) FROM mesh_outbox")
    deadline = time.monotonic() + within_s
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("relay", total=total)
        while time.monotonic() < deadline:
            left = await conn.fetchval(
                "SELECT count(*) FROM mesh_outbox WHERE published_at IS NULL"
            )
            bar.update(task, completed=total - left)
            if not left:
                return
            await asyncio.sleep(0.2)


def _scrape(ports: dict[str, int]) -> dict[str, float]:
    """Sum each agent metric (name{labels}) over the processes' /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for port in ports.values():
        code, text = _http_get(port, "/metrics")
        if code != 200:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("mesh_"):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    key = f"{sample.name}{{{labels}}}"
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for k, v in metrics.items()
               if k.split("{")[0] == name and all(w in k for w in want))  # fmt: skip


async def _summary(
    s: Settings, desk: Desk, r: RefundDemoResult, prefix: str, console: Console
) -> None:
    """This run's figures: Postgres rows of its sessions, the processes' own /metrics."""
    from agentmesh.dlq_cli import DlqFilter, read_dlq

    console.print()
    table = Table("outcome", "sessions", title="what happened to the tickets")
    for name in ("refunded", "compensated", "rejected", "expired"):
        table.add_row(name, str(r.outcomes.get(name, 0)))
    table.add_row("waiting for approval", str(r.waiting))
    table.add_row("dead-lettered (malformed)", str(r.dlq))
    console.print(table)

    entries = [e for e in await read_dlq(s.redis_url, s.dlq_stream, DlqFilter())
               if (e.session_id or "").startswith(prefix)]  # fmt: skip
    dt = Table("DLQ id", "agent", "session", "reason", "error", title="the DLQ (mesh dlq list)")
    for e in entries[:5]:
        dt.add_row(e.id, e.agent, e.session_id or "-", e.reason, e.error[:60])
    if len(entries) > 5:
        dt.add_row("…", "", f"and {len(entries) - 5} more", "", "")
    console.print(dt)

    m = await asyncio.to_thread(_scrape, desk.metrics_ports)
    ledger = read_ledger(desk.ledger)
    _, gw = await asyncio.to_thread(_http_get, desk.gateway_port, "/ledger")
    calls = json.loads(gw)["calls"] if gw else "?"
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        like = prefix + "%"
        actions = await conn.fetchval(
            "SELECT count(*) FROM mesh_actions WHERE session_id LIKE $1", like
        )
        in_kafka, backlog = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE published_at IS NOT NULL), "
            "count(*) FILTER (WHERE published_at IS NULL) FROM mesh_outbox "
            "WHERE session_id LIKE $1",
            like,
        )
        p50, p95 = await conn.fetchrow(_SESSION_TIMES_SQL, like) or (None, None)
    finally:
        await conn.close()
    r.breaker_openings = int(_sum(m, "mesh_breaker_opened_total", dependency="gateway"))
    mt = Table("figure", "value", "where it comes from", title="metrics")
    mt.add_row("tickets published", f"{r.tickets} ({r.malformed} malformed)", "this demo")
    for label, metric in (
        ("inputs handled (committed)", "processed"),
        ("deliveries retried", "retried"),
        ("duplicates skipped", "duplicate"),
        ("dead-lettered", "dead_lettered"),
    ):
        total = _sum(m, f"mesh_messages_{metric}_total")
        mt.add_row(label, f"{total:.0f}", "agents' /metrics")
    mt.add_row("payments breaker opened", f"{r.breaker_openings} time(s) during the outage",
               "payments' /metrics")  # fmt: skip
    mt.add_row("gateway calls / refunds paid", f"{calls} / {len(ledger)}",
               "the gateway's own ledger")  # fmt: skip
    mt.add_row("refunds paid twice", f"[{'red' if r.double_payments else 'green'}]"
               f"{r.double_payments}[/]", "the gateway's own ledger")  # fmt: skip
    if p50 is not None:
        mt.add_row("refund time p50 / p95", f"{p50:.2f} s / {p95:.2f} s",
                   "ticket in → ticket closed (Postgres)")  # fmt: skip
    mt.add_row("actions recorded", str(actions), "Postgres mesh_actions")
    mt.add_row("events in the Kafka audit log", f"{in_kafka} ({backlog} not yet relayed)",
               "Postgres mesh_outbox")  # fmt: skip
    mt.add_row("wall time", f"{r.elapsed_s:.1f} s", "")
    console.print(mt)


_SESSION_TIMES_SQL = """
WITH t AS (
  SELECT session_id, extract(epoch FROM max(created_at) - min(created_at)) AS s
  FROM mesh_outbox WHERE session_id LIKE $1 GROUP BY session_id
  HAVING bool_or(type = 'ticket.closed' AND envelope::jsonb->'payload'->>'outcome' = 'refunded')
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY s)
FROM t
"""
_BACKLOG_SQL = "SELECT count(*) FROM mesh_outbox WHERE published_at IS NULL"


async def _one_session(s: Settings, prefix: str, console: Console) -> str | None:
    """The refunded session the outage held up longest: its timeline shows the wait."""
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT p.session_id, extract(epoch FROM p.created_at - r.created_at) AS waited "
            "FROM mesh_actions p JOIN mesh_actions r ON r.session_id = p.session_id "
            "AND r.agent = 'risk' AND r.result->>'approved_by' = 'auto' "
            "WHERE p.agent = 'payments' AND p.result->>'refund_id' IS NOT NULL "
            "AND p.session_id LIKE $1 ORDER BY waited DESC LIMIT 1",
            prefix + "%",
        )
    finally:
        await conn.close()
    if row is None:
        return None
    console.print()
    console.print(f"Picked: the refund the gateway outage held up longest; it was paid "
                  f"{row['waited']:.1f} s after risk approved it (see the +s column).")  # fmt: skip
    return str(row["session_id"])


async def _next_steps(s: Settings, prefix: str, console: Console) -> None:
    """With --keep: the operator's next commands, with real ids from this run."""
    from agentmesh.dlq_cli import DlqFilter, read_dlq
    from agentmesh.outbox.sessions import waiting_steps

    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        waiting = [w for w in await waiting_steps(conn) if w.session_id.startswith(prefix)]
    finally:
        await conn.close()
    dead = [e for e in await read_dlq(s.redis_url, s.dlq_stream, DlqFilter())
            if (e.session_id or "").startswith(prefix)]  # fmt: skip
    console.print()
    console.print("[bold]the desk is still running (--keep).[/] Try, in another shell "
                  "(after `source .venv/bin/activate`):")  # fmt: skip
    lines = ["export MESH_AGENTS_MODULE=refund_desk", "mesh status"]
    if waiting:
        w = waiting[0].session_id
        lines += [f"mesh approve {w} --reason 'known customer'", f"mesh session {w}"]
        if len(waiting) > 1:
            lines.append(f"mesh reject {waiting[1].session_id} --reason 'duplicate claim'")
    if dead:
        e = dead[0]
        fixed = dict(e.envelope.get("payload", {})) if isinstance(e.envelope, dict) else {}
        fixed.update(amount_cents=1500, order_id="O-fixed")
        lines += [
            "mesh dlq list",
            f"mesh dlq show {e.id}",
            f"mesh dlq edit {e.id} --reason 'typo in amount' --payload '{json.dumps(fixed)}'",
            "mesh dlq retry NEW_ID --reason 'fixed by hand'   # the id dlq edit printed",
        ]
    lines += [f"mesh replay {prefix}0", "mesh dev down   # stops the desk and the stack"]
    for line in lines:
        console.print(f"  {line}", highlight=False, soft_wrap=True)
