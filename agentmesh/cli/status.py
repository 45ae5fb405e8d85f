"""`mesh status`: streams and groups, DLQ depth, breakers, shared budgets and the relay,
rendered from `Mesh.status`."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from agentmesh.cli.common import JsonOpt, ModuleOpt, emit_json, load_agents, out, run, safe
from agentmesh.client import Mesh, MeshStatus
from agentmesh.schemas import registry


def _idle(ms: float) -> str:
    return f"{ms / 1000:.1f}s" if ms < 120_000 else f"{ms / 60_000:.0f}m"


def status(
    all_streams: Annotated[
        bool, typer.Option("--all-streams", help="Every stream in the database, not the mesh's.")
    ] = False,
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Streams and groups (length, lag, pending, consumers), DLQ depth, breakers, relay backlog."""
    known: set[str] | None = None
    if not all_streams:
        load_agents(module)
        known = {t.stream for t in registry.types() if t.stream}

    async def go() -> MeshStatus:
        async with Mesh() as mesh:
            return await mesh.status(streams=known)

    data = run(go())
    if as_json:
        emit_json(asdict(data))
        return
    table = Table("stream", "length", "group", "lag", "pending", "consumers (pending, idle)")
    for r in data.streams:
        consumers = ", ".join(f"{safe(c.name, 60)} ({c.pending}, {_idle(c.idle_ms)})"
                              for c in r.consumers)  # fmt: skip
        lag = "?" if r.lag is None and r.group else str(r.lag if r.lag is not None else "-")
        pending = "-" if r.pending is None else str(r.pending)
        table.add_row(safe(r.stream, 80), str(r.length), safe(r.group or "-", 80), lag,
                      pending, consumers or "-")  # fmt: skip
    out.print(table)
    colour = "red" if data.dlq.depth else "green"
    out.print(f"DLQ {safe(data.dlq.stream)}: [{colour}]{data.dlq.depth}[/] message(s)")
    if data.breakers:
        bt = Table("agent", "dependency", "replica", "breaker", "opened")
        now = time.time()
        for b in data.breakers:
            state = {"closed": "[green]closed[/]", "open": "[red]open[/]"}.get(
                b.state, f"[yellow]{safe(b.state, 40)}[/]"
            )
            opened = "never"
            if b.opened:
                since = (now - b.last_opened_at) * 1000 if b.last_opened_at else 0
                opened = f"{b.opened}x, last {_idle(since)} ago"
            bt.add_row(safe(b.agent, 60), safe(b.dependency, 60), safe(b.replica, 60), state,
                       opened)  # fmt: skip
        out.print(bt)
    else:
        out.print("breakers: none reported (no running agent has a dependency)")
    if data.budgets:
        bt = Table("budget", "rate", "burst", "tokens now", "calls", "parked", "exhausted")
        for g in data.budgets:
            tokens = f"[red]{g.tokens:.1f}[/]" if g.tokens < 1 else f"{g.tokens:.1f}"
            bt.add_row(safe(g.name, 60), f"{g.rate_per_s:g}/s", f"{g.burst:g}", tokens,
                       str(g.granted), str(g.refused), f"{g.exhausted}x")  # fmt: skip
        out.print(bt)
    relay = data.relay
    out.print(
        f"relay: backlog {relay.backlog_rows} rows (oldest {relay.backlog_oldest_s:.1f} s), "
        f"{relay.slots_owned}/{relay.slots} partitions owned by {len(relay.relays)} relay(s)",
        highlight=False,
    )
