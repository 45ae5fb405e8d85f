"""`mesh relay …`, `mesh replay …` and `mesh outbox …`: the Kafka audit log from the shell,
rendered from `Mesh.relay_status`, `Mesh.replay`, `Mesh.republish` and `Mesh.redrive`."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from agentmesh.cli.common import (
    EXIT_FAILED,
    EXIT_INPUT,
    JsonOpt,
    ModuleOpt,
    emit_json,
    err,
    fail,
    load_agents,
    out,
    progress_bar,
    run,
    safe,
    settings,
)
from agentmesh.cli.timeline import render
from agentmesh.client import Mesh, RelayStatus
from agentmesh.outbox.relay import SlotConfigMismatch, serve
from agentmesh.outbox.replay import Replay, Until, fold_state
from agentmesh.outbox.resend import ResendResult, Selection
from agentmesh.outbox.snapshots import StateReplay
from agentmesh.process.logs import configure

relay_app = typer.Typer(help="The outbox → Kafka relay.", no_args_is_help=True)
outbox_app = typer.Typer(help="Re-send outbox rows to Kafka or Redis.", no_args_is_help=True)

SessionOpt = Annotated[str | None, typer.Option("--session", "-s", help="One session's rows.")]
ReasonOpt = Annotated[
    str, typer.Option("--reason", help="Why (recorded in the audit log with who asked).")
]
SinceOpt = Annotated[
    str | None, typer.Option("--since", help="Rows created since this ISO time (UTC if no zone).")
]


# -- relay ----------------------------------------------------------------------------------
@relay_app.command("run")
def relay_run(
    http_port: Annotated[
        int | None, typer.Option(help="Port of /healthz /readyz /metrics.")
    ] = None,
) -> None:
    """Publish the outbox to Kafka until SIGTERM/SIGINT. Run several for throughput and HA."""
    overrides: dict[str, Any] = {} if http_port is None else {"http_port": http_port}
    s = settings(**overrides)
    configure(fmt=s.log_format, level=s.log_level)
    try:
        run(serve(s))
    except SlotConfigMismatch as exc:
        fail(str(exc), EXIT_INPUT)


@relay_app.command("status")
def relay_status(as_json: JsonOpt = False) -> None:
    """Backlog, relays, and each partition's lease: owner, age, last progress, backlog."""

    async def go() -> RelayStatus:
        async with Mesh() as mesh:
            return await mesh.relay_status()

    data = run(go())
    if as_json:
        emit_json(asdict(data))
        return
    out.print(
        f"backlog: {data.backlog_rows} rows, oldest {data.backlog_oldest_s:.1f} s · "
        f"partitions: {data.slots_owned}/{data.slots} owned by {len(data.relays)} relay(s)",
        highlight=False,
    )
    table = Table("relay", "state", "partitions owned")
    for r in data.relays:
        table.add_row(safe(r.name), r.state, str(r.slots))
    out.print(table)
    leases = Table("partition", "owner", "epoch", "lease age", "expires in", "last progress",
                   "backlog", "oldest")  # fmt: skip
    for p in data.partitions:
        leases.add_row(
            str(p.partition), safe(p.owner) if p.owner else "(free)", str(p.epoch),
            _secs(p.lease_age_s), _secs(p.expires_in_s), _secs(p.last_progress_s),
            str(p.backlog_rows), _secs(p.backlog_oldest_s) if p.backlog_rows else "-",
        )  # fmt: skip
    if data.partitions:
        out.print(leases)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


# -- replay ---------------------------------------------------------------------------------
def replay(
    session: Annotated[str, typer.Argument(help="Session id.")],
    until: Annotated[
        str | None,
        typer.Option(help="Stop at this event id (inclusive) or ISO time, e.g. 2026-11-22T10:00Z."),
    ] = None,
    state: Annotated[
        bool, typer.Option("--state", help="Fold the events through the agents' projections.")
    ] = False,
    scan: Annotated[
        bool, typer.Option("--scan", help="Ignore the offset index; scan the session's partition.")
    ] = False,
    module: ModuleOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Envelopes as JSON lines.")] = False,
) -> None:
    """Replay a session from the Kafka audit log: each event once, in order."""
    try:
        cut = Until.parse(until) if until else None
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)
    agents = load_agents(module)

    snapshot = state and cut is None and not scan  # a stored snapshot + the records after it

    async def go(progress: Any) -> tuple[Replay, StateReplay | None]:
        async with Mesh() as mesh:
            if snapshot:
                sr = await mesh.replay_state(session, agents.values(), progress=progress)
                return sr.replay, sr
            return await mesh.replay(session, until=cut, scan=scan, progress=progress), None

    with progress_bar("reading Kafka", enabled=not as_json) as progress:
        try:
            rep, sr = run(go(progress))
        except ValueError as exc:  # --until names an event outside the session
            fail(str(exc), EXIT_INPUT)
    from_snapshot = sr.snapshot if sr is not None else None
    if not rep.events and not rep.missing and from_snapshot is None:
        pending = f" ({rep.unpublished} still in the outbox)" if rep.unpublished else ""
        fail(f"no events for session {session!r} in {rep.topic}{pending}", EXIT_FAILED)
    folded = fold_state(rep.events, agents.values()) if state and sr is None else None
    if sr is not None:
        folded = sr.state
    if as_json:
        for e in rep.events:
            sys.stdout.write(e.envelope.to_json() + "\n")
        if folded is not None:
            doc: dict[str, Any] = {"state": folded}
            if from_snapshot is not None:  # where it started, and what was read after it
                doc["snapshot"] = {**asdict(from_snapshot.cursor), "events": from_snapshot.events,
                                   "records_read_after": rep.records_read}  # fmt: skip
            emit_json(doc)
        _missing(rep, as_json=True)
        return
    if rep.events:
        render(rep, out)
    if from_snapshot is not None:
        out.print(
            f"[bold]state[/] from the snapshot of {from_snapshot.events} events (up to "
            f"{rep.topic}[{from_snapshot.cursor.partition}] offset {from_snapshot.cursor.offset})"
            f" and the {len(rep.events)} event(s) after it ({rep.records_read} records read):",
            highlight=False,
        )
        out.print_json(json.dumps(folded, default=str))
    elif folded is not None:
        out.print("[bold]state[/] (folded from the events above):")
        out.print_json(json.dumps(folded, default=str))
    _missing(rep, as_json=False)


def _missing(rep: Replay, *, as_json: bool) -> None:
    """Events the log shows should be there and are not: one line each and the repair
    command (JSON mode: one more JSON line), then exit 1. Nothing when none are missing."""
    if not rep.missing:
        return
    repair = f"mesh outbox republish --session {shlex.quote(rep.session_id)}"
    if as_json:
        emit_json({"missing": [asdict(m) for m in rep.missing], "repair": repair})
    else:
        for m in rep.missing:  # text from the log: made inert by safe()
            err.print(f"missing: {safe(m.describe())}", highlight=False)
        err.print(
            f"error: {len(rep.missing)} event(s) of session {safe(repr(rep.session_id))} are "
            f"missing from {safe(rep.topic)}; to send them again: {safe(repair)}",
            highlight=False,
        )
    raise typer.Exit(EXIT_FAILED)


# -- outbox ---------------------------------------------------------------------------------
def _selection(session: str | None, since: str | None) -> Selection:
    when = None
    if since is not None:
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            fail(f"--since {since!r} is not an ISO time", EXIT_INPUT)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    try:
        return Selection(session_id=session, since=when)
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)


@outbox_app.command("republish")
def outbox_republish(
    session: SessionOpt = None,
    since: SinceOpt = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the rows to reach Kafka (0: do not wait).")
    ] = 120.0,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Send already-published rows to Kafka again (after a broker or topic was lost)."""
    sel = _selection(session, since)

    async def go(progress: Any) -> tuple[ResendResult, str]:
        async with Mesh() as mesh:
            res = await mesh.republish(sel, reason=reason, wait_s=wait, progress=progress)
            return res, mesh.settings.audit_topic

    with progress_bar("republishing", enabled=not as_json) as progress:
        res, topic = run(go(progress))
    if as_json:
        emit_json(asdict(res))
    else:
        out.print(
            f"republished {res.sent} of {res.matched} outbox rows to {topic}"
            + (f"; {res.remaining} still queued for the relay" if res.remaining else ""),
            highlight=False,
        )
    if res.matched == 0 and not as_json:
        err.print("note: no published rows match (rows are pruned after MESH_OUTBOX_RETENTION_S)")
    if res.remaining and wait > 0:
        raise typer.Exit(EXIT_FAILED)


@outbox_app.command("redrive")
def outbox_redrive(
    session: SessionOpt = None,
    since: SinceOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Re-send stored handoffs onto their Redis streams (after Redis lost recent writes)."""
    sel = _selection(session, since)

    async def go(progress: Any) -> ResendResult:
        async with Mesh() as mesh:
            return await mesh.redrive(sel, reason=reason, progress=progress)

    with progress_bar("redriving", enabled=not as_json) as progress:
        res = run(go(progress))
    if as_json:
        emit_json(asdict(res))
    else:
        out.print(
            f"redrove {res.sent} of {res.matched} handoffs onto their streams "
            f"({res.skipped} were still there)",
            highlight=False,
        )
    if res.matched == 0 and not as_json:
        err.print("note: no handoff rows match (rows are pruned after MESH_OUTBOX_RETENTION_S)")
