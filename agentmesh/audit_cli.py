"""`mesh relay …`, `mesh replay …` and `mesh outbox …`: the Kafka audit log from the shell."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agentmesh.settings import load_settings

relay_app = typer.Typer(help="The outbox → Kafka relay.", no_args_is_help=True)
outbox_app = typer.Typer(help="Re-send outbox rows to Kafka or Redis.", no_args_is_help=True)

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SessionOpt = Annotated[str | None, typer.Option("--session", "-s", help="One session's rows.")]
ReasonOpt = Annotated[
    str, typer.Option("--reason", help="Why (recorded in the audit log with who asked).")
]
SinceOpt = Annotated[
    str | None, typer.Option("--since", help="Rows created since this ISO time (UTC if no zone).")
]


def _cli_error(message: str, code: int) -> Exception:
    from agentmesh.cli import CliError

    return CliError(message, code)


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


@contextmanager
def _bar(label: str, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr; `update(done, total)` moves it. Silent when disabled."""
    if not enabled:
        yield lambda done, total: None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


# -- relay ----------------------------------------------------------------------------------
@relay_app.command("run")
def relay_run(
    http_port: Annotated[
        int | None, typer.Option(help="Port of /healthz /readyz /metrics.")
    ] = None,
) -> None:
    """Publish the outbox to Kafka until SIGTERM/SIGINT. Run several for throughput and HA."""
    from agentmesh.logs import configure
    from agentmesh.outbox.relay import SlotConfigMismatch, serve

    overrides: dict[str, Any] = {} if http_port is None else {"http_port": http_port}
    s = load_settings(**overrides)
    configure(fmt=s.log_format, level=s.log_level)
    try:
        asyncio.run(serve(s))
    except SlotConfigMismatch as exc:
        raise _cli_error(str(exc), 2) from None


@relay_app.command("status")
def relay_status(as_json: JsonOpt = False) -> None:
    """Backlog (rows, age of the oldest), live relays and the slots each owns."""
    data = asyncio.run(_relay_status())
    if as_json:
        _emit(data)
        return
    out.print(
        f"backlog: {data['backlog_rows']} rows, oldest {data['backlog_oldest_s']:.1f} s · "
        f"partitions: {data['slots_owned']}/{data['slots']} owned by "
        f"{len(data['relays'])} relay(s)",
        highlight=False,
    )
    table = Table("relay (postgres pid)", "client address", "partitions owned")
    for r in data["relays"]:
        table.add_row(str(r["pid"]), str(r["client_addr"] or "local"), str(r["slots"]))
    out.print(table)


async def _relay_status() -> dict[str, Any]:
    import asyncpg

    from agentmesh.outbox.relay import MEMBER_LOCK_CLASS, SLOT_LOCK_CLASS

    s = load_settings()
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        backlog = await conn.fetchrow(
            """SELECT count(*) AS rows, COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)
                      ::float8 AS oldest FROM mesh_outbox WHERE published_at IS NULL"""
        )
        relays = await conn.fetch(
            """SELECT l.pid, a.client_addr::text AS client_addr,
                      (SELECT count(*) FROM pg_locks s WHERE s.pid = l.pid
                        AND s.locktype = 'advisory' AND s.classid = $2 AND s.granted) AS slots
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.objid = 0
                 AND l.objsubid = 2 AND l.granted
               ORDER BY l.pid""",
            MEMBER_LOCK_CLASS,
            SLOT_LOCK_CLASS,
        )
        slots = await conn.fetchval("SELECT slots FROM mesh_relay_config") or 0
    finally:
        await conn.close()
    assert backlog is not None
    return {
        "topic": s.audit_topic,
        "backlog_rows": backlog["rows"],
        "backlog_oldest_s": backlog["oldest"],
        "slots": slots,
        "slots_owned": sum(r["slots"] for r in relays),
        "relays": [dict(r) for r in relays],
    }


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
    module: Annotated[
        str | None, typer.Option("--module", "-m", help="Module defining the agents.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Envelopes as JSON lines.")] = False,
) -> None:
    """Replay a session from the Kafka audit log: each event once, in order."""
    from agentmesh.cli import EXIT_FAILED, EXIT_INPUT, load_agents
    from agentmesh.outbox.replay import Until, fold_state, replay_session
    from agentmesh.timeline import render

    s = load_settings()
    try:
        cut = Until.parse(until) if until else None
    except ValueError as exc:
        raise _cli_error(str(exc), EXIT_INPUT) from None
    agents = load_agents(module)
    with _bar("reading Kafka", enabled=not as_json and err.is_terminal) as progress:
        try:
            rep = asyncio.run(replay_session(s, session, until=cut, use_index=not scan,
                                             progress=progress))  # fmt: skip
        except ValueError as exc:  # --until names an event outside the session
            raise _cli_error(str(exc), EXIT_INPUT) from None
    if not rep.events:
        pending = f" ({rep.unpublished} still in the outbox)" if rep.unpublished else ""
        raise _cli_error(f"no events for session {session!r} in {rep.topic}{pending}", EXIT_FAILED)
    folded = fold_state(rep.events, agents.values()) if state else None
    if as_json:
        for e in rep.events:
            sys.stdout.write(e.envelope.to_json() + "\n")
        if folded is not None:
            _emit({"state": folded})
        return
    render(rep, out)
    if folded is not None:
        out.print("[bold]state[/] (folded from the events above):")
        out.print_json(json.dumps(folded, default=str))


# -- outbox ---------------------------------------------------------------------------------
def _selection(session: str | None, since: str | None) -> Any:
    from datetime import UTC

    from agentmesh.cli import EXIT_INPUT
    from agentmesh.outbox.resend import Selection

    when = None
    if since is not None:
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            raise _cli_error(f"--since {since!r} is not an ISO time", EXIT_INPUT) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    try:
        return Selection(session_id=session, since=when)
    except ValueError as exc:
        raise _cli_error(str(exc), EXIT_INPUT) from None


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
    from agentmesh.outbox.operator import current_operator
    from agentmesh.outbox.resend import Actor, republish

    sel = _selection(session, since)
    s = load_settings()
    actor = Actor(operator=current_operator(), reason=reason)
    with _bar("republishing", enabled=not as_json and err.is_terminal) as progress:
        res = asyncio.run(republish(s, sel, wait_s=wait, progress=progress, actor=actor))
    if as_json:
        _emit(res.__dict__)
    else:
        out.print(
            f"republished {res.sent} of {res.matched} outbox rows to {s.audit_topic}"
            + (f"; {res.remaining} still queued for the relay" if res.remaining else ""),
            highlight=False,
        )
    if res.matched == 0 and not as_json:
        err.print("note: no published rows match (rows are pruned after MESH_OUTBOX_RETENTION_S)")
    if res.remaining and wait > 0:
        raise typer.Exit(1)


@outbox_app.command("redrive")
def outbox_redrive(
    session: SessionOpt = None,
    since: SinceOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Re-send stored handoffs onto their Redis streams (after Redis lost recent writes)."""
    from agentmesh.outbox.operator import current_operator
    from agentmesh.outbox.resend import Actor, redrive

    sel = _selection(session, since)
    s = load_settings()
    actor = Actor(operator=current_operator(), reason=reason)
    with _bar("redriving", enabled=not as_json and err.is_terminal) as progress:
        res = asyncio.run(redrive(s, sel, progress=progress, actor=actor))
    if as_json:
        _emit(res.__dict__)
    else:
        out.print(
            f"redrove {res.sent} of {res.matched} handoffs onto their streams "
            f"({res.skipped} were still there)",
            highlight=False,
        )
    if res.matched == 0 and not as_json:
        err.print("note: no handoff rows match (rows are pruned after MESH_OUTBOX_RETENTION_S)")
