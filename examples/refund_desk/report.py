"""What `mesh demo` shows at the end: the tickets' outcomes, the DLQ, figures from the
agents' own /metrics and the gateway's own ledger, the session worth replaying, and (with
--keep) the operator's next commands with real ids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agentmesh import Mesh, Settings
from refund_desk.desk import Desk, http_get
from refund_desk.gateway_standin import read_ledger
from refund_desk.projection import desk as desk_projection

if TYPE_CHECKING:
    from refund_desk.demo import RefundDemoResult

EXAMPLES = Path(__file__).resolve().parents[1]  # the folder the agents module is imported from


def _scrape(ports: dict[str, int]) -> dict[str, float]:
    """Sum each agent metric (name{labels}) over the processes' /metrics."""
    totals: dict[str, float] = {}
    for port in ports.values():
        code, text = http_get(port, "/metrics")
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


async def summary(
    s: Settings, desk: Desk, r: RefundDemoResult, prefix: str, console: Console
) -> None:
    """This run's figures: Postgres rows of its sessions, the processes' own /metrics."""
    console.print()
    table = Table("outcome", "sessions", title="what happened to the tickets")
    for name in ("refunded", "compensated", "rejected", "expired"):
        table.add_row(name, str(r.outcomes.get(name, 0)))
    table.add_row("waiting for approval", str(r.waiting))
    table.add_row("dead-lettered (malformed)", str(r.dlq))
    console.print(table)

    async with Mesh(s) as mesh:
        entries = [e for e in await mesh.dlq.list() if e.session_id.startswith(prefix)]
        figures = await _figures(mesh, prefix + "%")
    dt = Table("DLQ id", "agent", "session", "reason", "error", title="the DLQ (mesh dlq list)")
    for e in entries[:5]:
        dt.add_row(e.id, escape(e.agent), escape(e.session_id or "-"), escape(e.reason),
                   escape(e.error[:60]))  # fmt: skip
    if len(entries) > 5:
        dt.add_row("…", "", f"and {len(entries) - 5} more", "", "")
    console.print(dt)

    m = await asyncio.to_thread(_scrape, desk.metrics_ports)
    ledger = read_ledger(desk.ledger)
    gw = await desk.gateway_admin("GET", "/ledger")
    calls = gw.body.get("calls", "?")
    actions, in_kafka, backlog, p50, p95 = figures
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


async def read_model(s: Settings, console: Console) -> None:
    """The refund desk's read model (examples/refund_desk/projection.py), folded from the Kafka
    audit log up to its end, as `mesh projection run refund_desk` keeps it live."""
    async with Mesh(s) as mesh:
        folded = await mesh.projections.catch_up(desk_projection)
        holds = await mesh.projections.query(desk_projection, "holds")
        days = await mesh.projections.query(desk_projection, "by_day")
    h = holds.rows[0] if holds.rows else {"open_holds": 0, "held_cents": 0}
    title = "read model: tickets by day and outcome (mesh projection query refund_desk by_day)"
    table = Table("day", "outcome", "tickets", "refunded", title=title)
    for row in days.rows:
        table.add_row(str(row["day"]), escape(str(row["outcome"])), str(row["tickets"]),
                      f"{(row['refunded_cents'] or 0) / 100:,.2f}")  # fmt: skip
    console.print(table)
    console.print(
        f"open holds: {h['open_holds']} ({(h['held_cents'] or 0) / 100:,.2f} held) · folded "
        f"{folded.folded} new events from {folded.records} audit records, each once "
        f"({folded.duplicates} duplicate copies skipped)",
        highlight=False,
    )


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


async def _figures(mesh: Mesh, like: str) -> tuple[int, int, int, float | None, float | None]:
    """Actions recorded, events in Kafka and not yet, refund time p50/p95 of this run."""
    pool = await mesh.pg()
    actions = await pool.fetchval(
        "SELECT count(*) FROM mesh_actions WHERE session_id LIKE $1", like
    )
    in_kafka, backlog = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE published_at IS NOT NULL), "
        "count(*) FILTER (WHERE published_at IS NULL) FROM mesh_outbox "
        "WHERE session_id LIKE $1",
        like,
    )
    p50, p95 = await pool.fetchrow(_SESSION_TIMES_SQL, like) or (None, None)
    return int(actions), int(in_kafka), int(backlog), p50, p95


async def one_session(s: Settings, prefix: str, console: Console) -> str | None:
    """The refunded session the outage held up longest: its timeline shows the wait."""
    async with Mesh(s) as mesh:
        row = await (await mesh.pg()).fetchrow(
            "SELECT p.session_id, extract(epoch FROM p.created_at - r.created_at) AS waited "
            "FROM mesh_actions p JOIN mesh_actions r ON r.session_id = p.session_id "
            "AND r.agent = 'risk' AND r.result->>'approved_by' = 'auto' "
            "WHERE p.agent = 'payments' AND p.result->>'refund_id' IS NOT NULL "
            "AND p.session_id LIKE $1 ORDER BY waited DESC LIMIT 1",
            prefix + "%",
        )
    if row is None:
        return None
    console.print()
    console.print(f"Picked: the refund the gateway outage held up longest; it was paid "
                  f"{row['waited']:.1f} s after risk approved it (see the +s column).")  # fmt: skip
    return str(row["session_id"])


async def next_steps(s: Settings, prefix: str, console: Console) -> None:
    """With --keep: the operator's next commands, with real ids from this run."""
    async with Mesh(s) as mesh:
        waiting = [w for w in await mesh.sessions(status="waiting", limit=1000)
                   if w.session_id.startswith(prefix)]  # fmt: skip
        dead = [e for e in await mesh.dlq.list() if e.session_id.startswith(prefix)]
    console.print()
    console.print("[bold]the desk is still running (--keep).[/] Try, in another shell "
                  "(after `source .venv/bin/activate`):")  # fmt: skip
    lines = [f"export PYTHONPATH={EXAMPLES}", "export MESH_AGENTS_MODULE=refund_desk",
             "mesh status"]  # fmt: skip
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
    lines += [
        f"mesh replay {prefix}0",
        "mesh projection query refund_desk by_day   # the read model the summary showed",
        "mesh projection status",
        "mesh dev down   # stops the desk and the stack",
    ]
    for line in lines:
        console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
