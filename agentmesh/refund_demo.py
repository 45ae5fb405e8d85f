"""`mesh demo`: the refund desk end to end on the local stack, as a newcomer first sees it.

Every agent is its own process (two payments replicas), the relay runs, the gateway
stand-in has an outage window, and a few hundred tickets go in, some malformed. It ends with
what happened to them, the DLQ with reasons, one session replayed from Kafka, and figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import agents.examples.refund_desk  # noqa: F401  (registers the refund desk's event types)
from agentmesh import devstack
from agentmesh.demo import MeshProc, _replay_one
from agentmesh.settings import Settings
from bus import Streams
from outbox.migrate import migrate
from outbox.publish import publish_events
from schemas import registry

MODULE = "agents.examples.refund_desk"


@dataclass
class RefundDemoResult:
    tickets: int
    malformed: int
    outcomes: dict[str, int]
    waiting: int
    dlq: int
    double_payments: int
    elapsed_s: float

    @property
    def ok(self) -> bool:
        settled = sum(self.outcomes.values()) + self.waiting
        return (settled == self.tickets - self.malformed and self.dlq == self.malformed
                and self.double_payments == 0)  # fmt: skip


def _tickets(n: int, seed: int = 7) -> list[tuple[str, dict[str, Any] | None]]:
    """(session, ticket) pairs; None marks a malformed one. About 85% pay automatically."""
    rnd = random.Random(seed)
    run = f"{int(time.time()) % 100000:05d}"
    texts = ["arrived broken", "never arrived", "delivered late", "wrong size", "changed my mind"]
    out: list[tuple[str, dict[str, Any] | None]] = []
    for i in range(n):
        roll = rnd.random()
        t: dict[str, Any] | None = {
            "ticket_id": f"T{run}-{i}", "customer": f"customer{i}@example.com",
            "order_id": f"O-{i}", "amount_cents": rnd.randint(500, 30_000),
            "text": rnd.choice(texts),
        }  # fmt: skip
        assert t is not None
        if roll < 0.04:
            t = None  # malformed
        elif roll < 0.09:
            t["amount_cents"] = rnd.randint(60_000, 200_000)  # a human must approve
        elif roll < 0.13:
            t["account"] = "closed"  # the gateway refuses: compensation
        elif roll < 0.16:
            t["amount_cents"] = 900_000  # over the desk's limit: rejected by intake
        out.append((f"refund-{run}-{i}", t))
    return out


def run_refund_demo(
    s: Settings,
    cfg: devstack.StackConfig,
    *,
    tickets: int,
    keep: bool,
    console: Console,
    outage: tuple[float, float] = (1.0, 6.0),
) -> RefundDemoResult:
    started = time.monotonic()
    with console.status("starting Redis, PostgreSQL and the Kafka-compatible broker…"):
        devstack.up(cfg)
        asyncio.run(migrate(s.postgres_dsn))
    console.print(f"[green]✓[/] local stack up in {cfg.root}")
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    ledger = cfg.root / "gateway-ledger.jsonl"
    ledger.write_text("")
    port = devstack.free_port()
    gw_log = (cfg.logs_dir / "gateway-standin.log").open("ab")
    gateway = subprocess.Popen(
        [sys.executable, "-m", f"{MODULE}.gateway_standin", "--port", str(port),
         "--ledger", str(ledger), "--latency", "0.005", "--outage", f"{outage[0]}-{outage[1]}"],
        stdout=gw_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {
        **os.environ,
        "MESH_REDIS_URL": s.redis_url,
        "MESH_POSTGRES_DSN": s.postgres_dsn,
        "MESH_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "MESH_AUDIT_TOPIC": s.audit_topic,
        "MESH_AGENTS_MODULE": MODULE,
        "MESH_HTTP_PORT": "0",
        "MESH_LOG_FORMAT": "json",
        "MESH_CLAIM_IDLE_MS": "2000",
        "REFUND_GATEWAY_URL": f"http://127.0.0.1:{port}",
    }
    names = ["intake", "risk", "payments", "payments", "notifier"]
    procs = [
        MeshProc(["agent", "run", n], env, cfg.logs_dir / f"agent-{n}-{i}.log")
        for i, n in enumerate(names)
    ]
    procs.append(MeshProc(["relay", "run"], env, cfg.logs_dir / "relay.log"))
    console.print(
        "[green]✓[/] started intake, risk, two payments replicas, notifier and the relay as "
        "processes, "
        f"and the payment gateway stand-in (outage {outage[0]:.0f}-{outage[1]:.0f} s); "
        f"logs in {cfg.logs_dir}"
    )
    try:
        batch = _tickets(tickets)
        result = asyncio.run(_publish_and_follow(s, batch, console, ledger, started))
        asyncio.run(_summary(s, result, batch, console, ledger))
        refunded = asyncio.run(_one_refunded(s))
        if refunded:
            asyncio.run(_replay_one(s, refunded, console))
    finally:
        for p in procs:
            p.stop()
        gateway.terminate()
        gateway.wait(10)
        gw_log.close()
        if not keep:
            devstack.down(cfg)
            console.print("[green]✓[/] agents, gateway and local stack stopped (data kept)")
        else:
            console.print("[green]✓[/] agents stopped; local stack left running (--keep). "
                          "Try: mesh sessions --status waiting · mesh approve SESSION · "
                          "mesh dlq list")  # fmt: skip
    result.elapsed_s = time.monotonic() - started
    return result


async def _publish_and_follow(
    s: Settings,
    batch: list[tuple[str, dict[str, Any] | None]],
    console: Console,
    ledger: Path,
    started: float,
) -> RefundDemoResult:
    from outbox.sessions import sessions

    redis = Redis.from_url(s.redis_url)
    conn = await asyncpg.connect(s.postgres_dsn)
    malformed = sum(t is None for _, t in batch)
    valid = len(batch) - malformed
    try:
        bus = Streams(redis, group="-", consumer="-", dedup_ttl_s=s.dedup_ttl_s)
        good = [
            ("refund:tickets", registry.make("ticket.submitted", t, session_id=sess, source="demo"))
            for sess, t in batch
            if t
        ]
        for i in range(0, len(good), 100):
            await publish_events(conn, bus, good[i : i + 100])
        for sess, t in batch:
            if t is None:
                bad = {"type": "ticket.submitted", "session_id": sess, "payload": {"amount": "ten"}}
                await redis.xadd("refund:tickets", {"envelope": json.dumps(bad)})
        console.print(f"[green]✓[/] published {valid} tickets and {malformed} malformed ones")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        deadline = time.monotonic() + 100
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("tickets settled", total=valid)
            while True:
                rows = await sessions(conn, limit=len(batch) + 10)
                mine = {sess for sess, _ in batch}
                status = Counter(r["status"] for r in rows if r["session_id"] in mine)
                outcomes = Counter(r["outcome"] for r in rows
                                   if r["session_id"] in mine and r["outcome"])  # fmt: skip
                dlq = int(await redis.xlen(s.dlq_stream))
                settled = status["ended"] + status["waiting"]
                bar.update(task, completed=settled, description=(
                    f"settled (refunded {outcomes['refunded']}, waiting {status['waiting']}, "
                    f"DLQ {dlq})"))  # fmt: skip
                if (settled >= valid and dlq >= malformed) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        paid = Counter(e["ticket_id"] for e in _ledger(ledger))
        return RefundDemoResult(
            tickets=len(batch), malformed=malformed, outcomes=dict(outcomes),
            waiting=status["waiting"], dlq=dlq,
            double_payments=sum(1 for c in paid.values() if c > 1),
            elapsed_s=time.monotonic() - started,
        )  # fmt: skip
    finally:
        await conn.close()
        await redis.aclose()


def _ledger(path: Path) -> list[dict[str, Any]]:
    """The gateway stand-in's own ledger: one line per refund it paid."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _summary(
    s: Settings, r: RefundDemoResult, batch: list[Any], console: Console, ledger: Path
) -> None:
    from agentmesh.dlq_cli import DlqFilter, read_dlq

    console.print()
    table = Table("outcome", "sessions", title="what happened to the tickets")
    for name in ("refunded", "compensated", "rejected", "expired"):
        table.add_row(name, str(r.outcomes.get(name, 0)))
    table.add_row("waiting for approval", str(r.waiting))
    table.add_row("dead-lettered (malformed)", str(r.dlq))
    console.print(table)
    entries = await read_dlq(s.redis_url, s.dlq_stream, DlqFilter())
    dt = Table("DLQ id", "agent", "reason", "error", title="the DLQ (mesh dlq list)")
    for e in entries[:8]:
        dt.add_row(e.id, e.agent, e.reason, e.error[:70])
    console.print(dt)
    lines = _ledger(ledger)
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        actions = await conn.fetchval("SELECT count(*) FROM mesh_actions")
        backlog = await conn.fetchval("SELECT count(*) FROM mesh_outbox WHERE published_at IS NULL")
    finally:
        await conn.close()
    mt = Table("figure", "value", title="metrics")
    mt.add_row("tickets", str(r.tickets))
    mt.add_row("handler actions recorded", str(actions))
    mt.add_row("refunds paid at the gateway", str(len(lines)))
    mt.add_row("refunds paid twice", f"[{'red' if r.double_payments else 'green'}]"
               f"{r.double_payments}[/]")  # fmt: skip
    mt.add_row("outbox rows not yet in Kafka", str(backlog))
    mt.add_row("wall time so far", f"{r.elapsed_s:.1f} s")
    console.print(mt)


async def _one_refunded(s: Settings) -> str | None:
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        row = await conn.fetchval(
            "SELECT session_id FROM mesh_actions WHERE result->'session_end'->>'outcome' = "
            "'refunded' AND session_id IN (SELECT session_id FROM mesh_actions "
            "WHERE input_type = 'approval.decided') ORDER BY id DESC LIMIT 1"
        ) or await conn.fetchval(
            "SELECT session_id FROM mesh_actions WHERE result->'session_end'->>'outcome' = "
            "'refunded' ORDER BY id DESC LIMIT 1"
        )
        return str(row) if row else None
    finally:
        await conn.close()
