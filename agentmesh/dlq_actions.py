"""`mesh dlq retry|drop|edit`: the operator's hands on the DLQ.

Each action is first written to the audit log (an outbox row, so it reaches Kafka and shows
in `mesh replay` of the message's session) with who did it and why, then carried out as one
atomic Redis step. Exit codes: 0 all done, 1 some entries were skipped, 2 bad input.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import typer
from rich.table import Table

from agentmesh.dlq_cli import (
    AgentOpt,
    DlqEntry,
    JsonOpt,
    MatchOpt,
    NewerOpt,
    OlderOpt,
    StreamOpt,
    dlq_app,
    make_filter,
    read_dlq,
    read_one,
)
from agentmesh.outbox.operator import current_operator


@dataclass(kw_only=True)
class Outcome:
    id: str
    done: bool
    detail: str  # the new entry id, or why it was skipped
    audit_event_id: str | None = None


IdArg = Annotated[str | None, typer.Argument(metavar="[ID]", help="DLQ entry id.")]
WhyOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every entry in the DLQ.")]
ModuleOpt = Annotated[
    str | None,
    typer.Option("--module", "-m", help="Module defining the agents (MESH_AGENTS_MODULE)."),
]


def _select(ident: str | None, everything: bool, filters: tuple[str | None, ...]) -> list[DlqEntry]:
    from agentmesh.cli import EXIT_FAILED, EXIT_INPUT, fail, run, settings

    s = settings()
    chosen = sum((ident is not None, everything, any(f is not None for f in filters)))
    if chosen != 1:
        fail("choose the entries: an ID, filter options, or --all (exactly one)", EXIT_INPUT)
    if ident is not None:
        entry = run(read_one(s.redis_url, s.dlq_stream, ident))
        if entry is None:
            fail(f"no DLQ entry {ident} in {s.dlq_stream}", EXIT_FAILED)
        return [entry]
    return run(read_dlq(s.redis_url, s.dlq_stream, make_filter(*filters)))


def _validate(raw: bytes) -> str | None:
    """None when the envelope decodes against its schema, else why not."""
    from agentmesh.schemas import PoisonMessage, registry

    try:
        registry.decode(raw)
    except PoisonMessage as exc:
        return f"{exc.reason}: {exc}"
    return None


async def _apply(
    action: str, entries: list[DlqEntry], why: str, show: bool, *, force: bool = False
) -> list[Outcome]:
    import asyncpg
    from redis.asyncio import Redis
    from rich.progress import Progress

    from agentmesh.cli import err, settings

    s = settings()
    redis = Redis.from_url(s.redis_url)
    conn = await asyncpg.connect(s.postgres_dsn)
    outcomes: list[Outcome] = []
    try:
        with Progress(console=err, transient=True, disable=not show or len(entries) < 2) as bar:
            task = bar.add_task(action, total=len(entries))
            for e in entries:
                outcomes.append(await _one(action, e, why, s.dlq_stream, redis, conn, force))
                bar.advance(task)
    finally:
        await conn.close()
        await redis.aclose()
    return outcomes


async def _one(
    action: str, e: DlqEntry, why: str, dlq_stream: str, redis: Any, conn: Any, force: bool
) -> Outcome:
    from agentmesh.bus import dlq
    from agentmesh.outbox.operator import record_operator_action

    if action == "retry":
        invalid = _validate(e.raw)
        if invalid:
            return Outcome(
                id=e.id, done=False, detail=f"invalid ({invalid}); fix it with mesh dlq edit"
            )
    env = e.envelope if isinstance(e.envelope, dict) else {}
    if action == "drop" and not force:
        step = await _open_step(conn, env.get("session_id"))
        if step:
            return Outcome(id=e.id, done=False, detail=(
                f"session {env['session_id']} is still open ({step}): dropping this message "
                "would leave it unfinished; retry it, or drop with --force"))  # fmt: skip
    audit = await record_operator_action(
        conn,
        operator=current_operator(),
        action=f"dlq.{action}",
        reason=why,
        target=e.id,
        session_id=env.get("session_id"),
        event_id=env.get("event_id"),
        stream=e.stream,
        detail={"dlq_reason": e.reason, "agent": e.agent, "error": e.error[:500]},
    )
    if action == "retry":
        new_id = await dlq.retry(
            redis,
            dlq_stream=dlq_stream,
            dlq_id=e.id,
            stream=e.stream,
            group=e.group,
            entry_id=e.entry_id,
            envelope=e.raw,
        )
        done, detail = new_id is not None, f"{e.stream} {new_id}" if new_id else "already gone"
    else:
        done = await dlq.drop(redis, dlq_stream=dlq_stream, dlq_id=e.id)
        detail = "dropped" if done else "already gone"
    return Outcome(id=e.id, done=done, detail=detail, audit_event_id=audit.event_id)


async def _open_step(conn: Any, session_id: Any) -> str | None:
    """Where a session that agents have acted in, and that has not ended, stands; else None.
    A message dead-lettered mid-saga (a payment after its hold was placed) is such a case."""
    from agentmesh.outbox.sessions import sessions

    if not isinstance(session_id, str):
        return None
    rows = await sessions(conn, session_id=session_id, limit=1)
    if not rows or rows[0]["status"] == "ended":
        return None
    return f"{rows[0]['status']}: {rows[0]['step']}"


def _report(action: str, outcomes: list[Outcome], as_json: bool) -> None:
    from agentmesh.cli import EXIT_FAILED, emit_json, out

    if as_json:
        emit_json([asdict(o) for o in outcomes])
    else:
        table = Table("id", action, "detail", "audit event")
        for o in outcomes:
            table.add_row(
                o.id, "[green]yes[/]" if o.done else "[red]no[/]", o.detail, o.audit_event_id or "-"
            )
        out.print(table)
        out.print(f"{sum(o.done for o in outcomes)} of {len(outcomes)} {action}")
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
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")] = "",
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put entries back onto their original stream: same event id, delivery count reset."""
    from agentmesh.cli import load_agents, run

    load_agents(module)  # the event types, to re-validate before anything is re-driven
    entries = _select(ident, everything, (stream, agent, match, older_than, newer_than))
    _report("retried", run(_apply("retry", entries, reason, not as_json)), as_json)


@dlq_app.command("drop")
def dlq_drop(
    reason: WhyOpt,
    ident: IdArg = None,
    stream: StreamOpt = None,
    agent: AgentOpt = None,
    match: MatchOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    everything: AllOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Drop even a message whose session is still open.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove entries for good; --reason is required and goes to the audit log. A message of
    a session agents have acted in and that has not ended is kept unless --force."""
    from agentmesh.cli import EXIT_INPUT, fail, run

    if not reason.strip():
        fail("--reason must say why the entries are dropped", EXIT_INPUT)
    entries = _select(ident, everything, (stream, agent, match, older_than, newer_than))
    outcomes = run(_apply("drop", entries, reason, not as_json, force=force))
    _report("dropped", outcomes, as_json)


@dlq_app.command("edit")
def dlq_edit(
    ident: Annotated[str, typer.Argument(metavar="ID", help="DLQ entry id.")],
    payload: Annotated[
        str | None, typer.Option("--payload", "-p", help="New payload: JSON, @file or -.")
    ] = None,
    envelope: Annotated[
        str | None,
        typer.Option(
            "--envelope",
            help="A whole new envelope (JSON, @file or -), for an entry whose envelope itself "
            "is broken, e.g. without an event_id.",
        ),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")] = "",
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fix an entry's payload (--payload or $EDITOR) or whole envelope (--envelope).

    The result is re-validated before it is kept, and gets a new DLQ id; `mesh dlq retry
    NEW_ID` re-drives it."""
    from agentmesh.cli import (
        EXIT_FAILED,
        EXIT_INPUT,
        emit_json,
        fail,
        load_agents,
        out,
        read_payload,
        run,
    )

    load_agents(module)
    if payload is not None and envelope is not None:
        fail("give --payload or --envelope, not both", EXIT_INPUT)
    (entry,) = _select(ident, False, (None,) * 5)
    if envelope is not None:
        edited = read_payload(envelope)
        if not isinstance(edited, dict):
            fail("envelope must be a JSON object", EXIT_INPUT)
        new_payload = edited.get("payload")
        what = "envelope"
    else:
        if not isinstance(entry.envelope, dict):
            fail(f"entry {ident} is not a JSON envelope: fix it whole with --envelope", EXIT_FAILED)
        new_payload = (
            read_payload(payload)
            if payload is not None
            else _in_editor(entry.envelope.get("payload"))
        )
        if not isinstance(new_payload, dict):
            fail("payload must be a JSON object", EXIT_INPUT)
        edited = {**entry.envelope, "payload": new_payload}
        what = "payload"
    raw = json.dumps(edited, separators=(",", ":")).encode()
    invalid = _validate(raw)
    if invalid:
        fail(f"edited {what} is still invalid, nothing changed: {invalid}", EXIT_INPUT)
    new_id, audit_id = run(_edit(entry, raw, reason, edited))
    if new_id is None:
        fail(f"DLQ entry {ident} is already gone (another operator acted)", EXIT_FAILED)
    if as_json:
        emit_json(
            {"id": ident, "new_id": new_id, "audit_event_id": audit_id, "payload": new_payload}
        )
    else:
        out.print(
            f"edited {ident}: now DLQ entry {new_id}; re-drive it with: mesh dlq retry {new_id}"
        )


def _in_editor(payload: Any) -> Any:
    from agentmesh.cli import EXIT_INPUT, fail

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
        json.dump(payload, f, indent=2)
        path = f.name
    try:
        if subprocess.call([*editor.split(), path]) != 0:
            fail(f"editor {editor!r} exited with an error; nothing changed", EXIT_INPUT)
        with open(path) as f:
            text = f.read()
    finally:
        os.unlink(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"edited payload is not valid JSON, nothing changed: {exc}", EXIT_INPUT)


async def _edit(
    entry: DlqEntry, raw: bytes, why: str, edited: dict[str, Any]
) -> tuple[str | None, str]:
    import asyncpg
    from redis.asyncio import Redis

    from agentmesh.bus import dlq
    from agentmesh.cli import settings
    from agentmesh.dlq_cli import _xrange
    from agentmesh.outbox.operator import record_operator_action

    s = settings()
    redis = Redis.from_url(s.redis_url)
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        page = await _xrange(redis, s.dlq_stream, entry.id, entry.id)
        if not page:
            return None, ""
        audit = await record_operator_action(
            conn,
            operator=current_operator(),
            action="dlq.edit",
            reason=why,
            target=entry.id,
            session_id=edited.get("session_id"),
            event_id=edited.get("event_id"),
            stream=entry.stream,
            detail=_before_after(entry.envelope, edited),
        )
        fields = {
            **page[0][1],
            b"envelope": raw,
            b"edited_by": current_operator().encode(),
            b"edited_from": entry.id.encode(),
        }
        new_id = await dlq.replace(redis, dlq_stream=s.dlq_stream, dlq_id=entry.id, fields=fields)
        return new_id, audit.event_id
    finally:
        await conn.close()
        await redis.aclose()


def _before_after(before: Any, after: dict[str, Any]) -> dict[str, Any]:
    """What the audit log keeps of an edit: the payloads, and the envelope fields that changed."""
    old = before if isinstance(before, dict) else {"unreadable": str(before)[:2000]}
    changed = sorted(k for k in {*old, *after} - {"payload"} if old.get(k) != after.get(k))
    return {
        "before": old.get("payload"),
        "after": after.get("payload"),
        "envelope_fields_changed": {k: [old.get(k), after.get(k)] for k in changed},
    }
