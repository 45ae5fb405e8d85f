"""`mesh dlq list|show|retry|drop|edit`: argument handling and rendering over `Mesh.dlq`.

retry, drop and edit are recorded in the audit log with the operator's identity and reason
before they are carried out, each as one atomic step in Redis (see agentmesh.client.dlq).
Exit codes: 0 all done, 1 some entries were skipped (or none found), 2 bad input.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from agentmesh.cli.common import (
    EXIT_FAILED,
    EXIT_INPUT,
    JsonOpt,
    ModuleOpt,
    ReasonOpt,
    ago,
    emit_json,
    fail,
    json_text,
    load_agents,
    out,
    progress_bar,
    run,
    safe,
)
from agentmesh.cli.dlq_edit import edit_cmd
from agentmesh.client import DlqEntry, DlqFilter, DlqOutcome, Mesh

dlq_app = typer.Typer(help="Inspect the dead-letter queue.", no_args_is_help=True)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

StreamOpt = Annotated[str | None, typer.Option("--stream", help="Original stream.")]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="Agent that gave up.")]
MatchOpt = Annotated[str | None, typer.Option("--match", help="Text in the reason or error.")]
OlderOpt = Annotated[str | None, typer.Option("--older-than", help="Age, e.g. 15m, 2h.")]
NewerOpt = Annotated[str | None, typer.Option("--newer-than", help="Age, e.g. 30s, 1d.")]

#: How much of one value a view shows: a table cell of `dlq list`, a field of `dlq show`, and
#: a text envelope or traceback (--json has them whole).
CELL, FIELD, BLOCK = 60, 4000, 20_000
IdArg = Annotated[str | None, typer.Argument(metavar="[ID]", help="DLQ entry id.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every entry in the DLQ.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Drop even a message whose session is still open.")
]


def parse_age(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        fail(f"bad age {text!r}: use a number with s, m, h or d (e.g. 15m)", EXIT_INPUT)
    return float(match[1]) * _UNIT_S[match[2]]


def make_filter(
    stream: str | None,
    agent: str | None,
    match: str | None,
    older_than: str | None,
    newer_than: str | None,
) -> DlqFilter | None:
    """The filter the options describe; None when no filter option was given."""
    if all(v is None for v in (stream, agent, match, older_than, newer_than)):
        return None
    return DlqFilter(
        stream=stream,
        agent=agent,
        reason=match,
        older_than_s=parse_age(older_than) if older_than else None,
        newer_than_s=parse_age(newer_than) if newer_than else None,
    )


def _summary(e: DlqEntry) -> dict[str, Any]:
    data = asdict(e)
    data.pop("traceback")
    data.pop("raw")
    data.update(event_type=e.event_type, session_id=e.session_id)
    return data


@dlq_app.command("list")
def dlq_list(
    stream: StreamOpt = None,
    agent: AgentOpt = None,
    match: MatchOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dead-lettered messages, oldest first, with why they failed."""
    flt = make_filter(stream, agent, match, older_than, newer_than)

    async def go() -> tuple[list[DlqEntry], str]:
        async with Mesh() as mesh:
            return await mesh.dlq.list(flt), mesh.dlq.stream

    entries, dlq_stream = run(go())
    if as_json:
        emit_json([_summary(e) for e in entries])
        return
    table = Table("id", "age", "stream", "agent", "type", "session", "reason", "tries", "error")
    for e in entries:
        table.add_row(safe(e.id), ago(e.age_s), safe(e.stream, CELL), safe(e.agent, CELL),
                      safe(e.event_type, CELL), safe(e.session_id, CELL), safe(e.reason, CELL),
                      str(e.deliveries), safe(e.error, CELL))  # fmt: skip
    out.print(table)
    out.print(f"{len(entries)} dead-lettered message(s) in {safe(dlq_stream)}")


@dlq_app.command("show")
def dlq_show(
    ident: Annotated[str, typer.Argument(metavar="ID", help="DLQ entry id (from dlq list).")],
    as_json: JsonOpt = False,
) -> None:
    """One dead-lettered message: its full envelope, the reason and its delivery history."""

    async def go() -> DlqEntry:
        async with Mesh() as mesh:
            return await mesh.dlq.show(ident)

    entry = run(go())
    if as_json:
        emit_json({**_summary(entry), "traceback": entry.traceback,
                   "event_type": entry.event_type, "session_id": entry.session_id})  # fmt: skip
        return
    table = Table("field", "value", show_header=False)
    for name, value in (
        ("DLQ id", entry.id),
        ("age", ago(entry.age_s)),
        ("from", f"{entry.stream} entry {entry.entry_id} (group {entry.group})"),
        ("agent", entry.agent),
        ("reason", entry.reason),
        ("error", f"{entry.error_type}: {entry.error}"),
        ("deliveries", str(entry.deliveries)),
        ("first failure", entry.first_failure),
        ("last failure", entry.last_failure),
        ("dead-lettered", entry.dead_lettered_at),
    ):
        table.add_row(name, safe(value, FIELD))
    out.print(table)
    note = f" ({safe(entry.envelope_error, FIELD)})" if entry.envelope_error else ""
    out.print(f"envelope{note}:", highlight=False)
    if isinstance(entry.envelope, str):  # not JSON (or too deep to decode): the text itself
        out.print(safe(entry.envelope, BLOCK, lines=True), highlight=False)
    else:  # depth-limited, every string made safe; never rich's JSON of data from the wire
        out.print(safe(json_text(entry.envelope), lines=True), highlight=False)
    if entry.traceback:
        out.print("traceback:")
        out.print(safe(entry.traceback, BLOCK, lines=True), highlight=False)


def _act(
    action: str,
    ident: str | None,
    everything: bool,
    filters: tuple[str | None, ...],
    reason: str,
    as_json: bool,
    force: bool = False,
) -> None:
    """Select the entries, retry or drop them (a progress bar when there are several), and
    report each outcome; exit 1 when any was skipped."""
    flt = make_filter(*filters)
    if sum((ident is not None, everything, flt is not None)) != 1:
        fail("choose the entries: an ID, filter options, or --all (exactly one)", EXIT_INPUT)

    async def go() -> list[DlqOutcome]:
        async with Mesh() as mesh:
            entries = await mesh.dlq.select(ident, everything=everything, flt=flt)
            with progress_bar(action, not as_json and len(entries) > 1) as update:
                if action == "retry":
                    return await mesh.dlq.retry(entries, reason=reason, on_progress=update)
                return await mesh.dlq.drop(entries, reason=reason, force=force,
                                           on_progress=update)  # fmt: skip

    outcomes = run(go())
    done = {"retry": "retried", "drop": "dropped"}[action]
    if as_json:
        emit_json([asdict(o) for o in outcomes])
    else:
        table = Table("id", done, "detail", "audit event")
        for o in outcomes:
            table.add_row(safe(o.id), "[green]yes[/]" if o.done else "[red]no[/]",
                          safe(o.detail, 300), safe(o.audit_event_id or "-"))  # fmt: skip
        out.print(table)
        out.print(f"{sum(o.done for o in outcomes)} of {len(outcomes)} {done}")
    if not all(o.done for o in outcomes):
        raise typer.Exit(EXIT_FAILED)


@dlq_app.command("retry")
def dlq_retry(
    ident: IdArg = None,
    stream: StreamOpt = None,
    agent: AgentOpt = None,
    match: MatchOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    everything: AllOpt = False,
    reason: ReasonOpt = "",
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put entries back onto their original stream: same event id, delivery count reset."""
    load_agents(module)  # the event types, to re-validate before anything is re-driven
    _act("retry", ident, everything, (stream, agent, match, older_than, newer_than), reason,
         as_json)  # fmt: skip


@dlq_app.command("drop")
def dlq_drop(
    reason: ReasonOpt,
    ident: IdArg = None,
    stream: StreamOpt = None,
    agent: AgentOpt = None,
    match: MatchOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    everything: AllOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove entries for good; --reason is required and goes to the audit log. A message of
    a session agents have acted in and that has not ended is kept unless --force."""
    if not reason.strip():
        fail("--reason must say why the entries are dropped", EXIT_INPUT)
    _act("drop", ident, everything, (stream, agent, match, older_than, newer_than), reason,
         as_json, force=force)  # fmt: skip


dlq_app.command("edit")(edit_cmd)
