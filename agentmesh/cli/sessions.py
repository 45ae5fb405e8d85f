"""`mesh sessions`, `mesh session ID`, `mesh approve|reject SESSION`: argument handling and
rendering over `Mesh.sessions`, `Mesh.session`, `Mesh.replay`, `Mesh.approve|reject`."""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from agentmesh.cli.common import (
    EXIT_FAILED,
    EXIT_INPUT,
    JsonOpt,
    ModuleOpt,
    ago_ts,
    emit_json,
    err,
    fail,
    load_agents,
    out,
    run,
    safe,
)
from agentmesh.cli.timeline import render
from agentmesh.client import DecisionOutcome, Mesh, SessionState
from agentmesh.outbox.replay import Replay

COLOUR = {"ended": "green", "waiting": "yellow", "running": "cyan"}


def sessions_cmd(
    status: Annotated[
        str | None, typer.Option("--status", help="running, waiting or ended.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Recent sessions, newest activity first: status, current step, age."""

    async def go() -> list[SessionState]:
        async with Mesh() as mesh:
            return await mesh.sessions(status=status, limit=limit)

    rows = run(go())
    if as_json:
        emit_json([asdict(r) for r in rows])
        return
    table = Table("session", "status", "step / outcome", "age", "last activity", "actions")
    for r in rows:
        status = f"[{COLOUR.get(r.status, 'white')}]{safe(r.status, 20)}[/]"
        last = ago_ts(r.last_activity) + " ago"
        table.add_row(safe(r.session_id, 80), status, safe(r.step, 80), ago_ts(r.started), last,
                      str(r.actions))  # fmt: skip
    out.print(table)


def session_cmd(
    session: Annotated[str, typer.Argument(help="Session id.")],
    replay: Annotated[
        bool, typer.Option("--replay/--no-replay", help="Also replay the timeline from Kafka.")
    ] = True,
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One session: live status from Postgres, then its timeline replayed from Kafka."""
    load_agents(module)

    async def go() -> tuple[SessionState | None, Replay | None]:
        async with Mesh() as mesh:
            state = await mesh.session(session)
            if state is None or not replay:
                return state, None
            return state, await mesh.replay(session)

    row, rep = run(go())
    if row is None:
        fail(f"no session {session!r}: no agent has acted in it", EXIT_FAILED)
    timeline = rep.events if rep else []
    unpublished = (rep.unpublished or 0) if rep else 0
    missing = rep.missing if rep else []
    if as_json:
        emit_json({**asdict(row), "unpublished": unpublished,
                   "missing": [asdict(m) for m in missing],
                   "timeline": [e.envelope.model_dump(mode="json") for e in timeline]})  # fmt: skip
        return
    deadline = ""
    if row.deadline:
        left = row.deadline - time.time()
        deadline = f" · deadline in {left:.0f} s" if left > 0 else " · deadline passed"
    out.print(
        f"session {safe(session)}: [bold]{safe(row.status, 20)}[/] · {safe(row.step, 200)}"
        + (f" ({safe(row.reason, 500)})" if row.reason else "")
        + deadline
        + f" · {row.actions} action(s), started {ago_ts(row.started)} ago",
        highlight=False,
    )
    if rep is not None and timeline:
        render(rep, out)
    if unpublished:
        out.print(f"{unpublished} event(s) still in the outbox, not yet in Kafka")
    if missing:  # `mesh replay SESSION` lists them
        out.print(f"{len(missing)} event(s) missing from Kafka; to send them again: "
                  f"mesh outbox republish --session {safe(shlex.quote(session))}")  # fmt: skip


def approve_cmd(
    session: Annotated[str, typer.Argument(help="Session waiting for a decision.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")] = "",
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve the step a session is waiting on."""
    _decide(session, "approve", reason, module, as_json)


def reject_cmd(
    session: Annotated[str, typer.Argument(help="Session waiting for a decision.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required; the customer sees it).")],
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reject the step a session is waiting on; the session is compensated and closed."""
    if not reason.strip():
        fail("--reason must say why", EXIT_INPUT)
    _decide(session, "reject", reason, module, as_json)


def _decide(session: str, decision: str, reason: str, module: str | None, as_json: bool) -> None:
    """Exit 1 when another decision on the step (an operator's, the deadline's) won."""
    load_agents(module)

    async def go() -> DecisionOutcome:
        async with Mesh() as mesh:
            if decision == "approve":
                return await mesh.approve(session, reason=reason)
            return await mesh.reject(session, reason=reason)

    d = run(go())
    if as_json:
        data: dict[str, Any] = asdict(d)
        emit_json(data)
    else:
        done = {"approve": "approved", "reject": "rejected"}[decision]
        out.print(f"{done} session {safe(session)} ({safe(d.step, 200)}) as "
                  f"{safe(d.operator, 200)}; event {safe(d.event_id)}")  # fmt: skip
        if d.acted_on.event_id is None:
            err.print(f"note: {safe(d.agent, 200)} has not acted on it yet (is it running?)")
    if not d.won:
        err.print(
            "error: another decision on this step was acted on first: "
            f"{safe(d.acted_on.decision, 200)} by {safe(d.acted_on.operator, 200)}; "
            "yours was skipped",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)
