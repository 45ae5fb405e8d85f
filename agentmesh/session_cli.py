"""`mesh sessions`, `mesh session ID`, `mesh approve|reject SESSION`.

Status comes from Postgres (outbox/sessions.py), the timeline from the Kafka audit log. An
approval is published like any event that enters the mesh (outbox row, then the
deduplicated XADD) with the step's shared idempotency key, and is recorded as a
`mesh.operator` action with who decided and why.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ModuleOpt = Annotated[
    str | None,
    typer.Option("--module", "-m", help="Module defining the agents (MESH_AGENTS_MODULE)."),
]
STATUSES = ("running", "waiting", "ended")


def _ago(ts: datetime) -> str:
    s = (datetime.now(UTC) - ts).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"


async def _sessions(session_id: str | None, limit: int) -> list[dict[str, Any]]:
    import asyncpg

    from agentmesh.cli import settings
    from agentmesh.outbox.sessions import sessions

    conn = await asyncpg.connect(settings().postgres_dsn)
    try:
        return await sessions(conn, session_id=session_id, limit=limit)
    finally:
        await conn.close()


def sessions_cmd(
    status: Annotated[
        str | None, typer.Option("--status", help="running, waiting or ended.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Recent sessions, newest activity first: status, current step, age."""
    from agentmesh.cli import EXIT_INPUT, emit_json, fail, out, run

    if status is not None and status not in STATUSES:
        fail(f"unknown status {status!r}; choose from {', '.join(STATUSES)}", EXIT_INPUT)
    rows = run(_sessions(None, limit if status is None else 10_000))
    if status:
        rows = [r for r in rows if r["status"] == status][:limit]
    if as_json:
        emit_json(rows)
        return
    table = Table("session", "status", "step / outcome", "age", "last activity", "actions")
    colour = {"ended": "green", "waiting": "yellow", "running": "cyan"}
    for r in rows:
        table.add_row(
            r["session_id"],
            f"[{colour[r['status']]}]{r['status']}[/]",
            r["step"],
            _ago(r["started"]),
            _ago(r["last_activity"]) + " ago",
            str(r["actions"]),
        )
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
    from agentmesh.cli import EXIT_FAILED, emit_json, fail, load_agents, out, run, settings

    load_agents(module)
    rows = run(_sessions(session, 1))
    if not rows:
        fail(f"no session {session!r}: no agent has acted in it", EXIT_FAILED)
    (row,) = rows
    timeline: list[Any] = []
    unpublished = 0
    if replay:
        from agentmesh.outbox.replay import replay_session

        rep = run(replay_session(settings(), session))
        timeline, unpublished = rep.events, rep.unpublished or 0
    if as_json:
        emit_json(
            {
                **row,
                "unpublished": unpublished,
                "timeline": [e.envelope.model_dump(mode="json") for e in timeline],
            }
        )
        return
    deadline = ""
    if row["deadline"]:
        left = row["deadline"] - time.time()
        deadline = f" · deadline in {left:.0f} s" if left > 0 else " · deadline passed"
    out.print(
        f"session {session}: [bold]{row['status']}[/] · {row['step']}"
        + (f" ({row['reason']})" if row["reason"] else "")
        + deadline
        + f" · {row['actions']} action(s), started {_ago(row['started'])} ago",
        highlight=False,
    )
    if replay:
        if timeline:
            from agentmesh.timeline import render

            render(rep, out)
        if unpublished:
            out.print(f"{unpublished} event(s) still in the outbox, not yet in Kafka")


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
    from agentmesh.cli import EXIT_INPUT, fail

    if not reason.strip():
        fail("--reason must say why", EXIT_INPUT)
    _decide(session, "reject", reason, module, as_json)


def _decide(session: str, decision: str, reason: str, module: str | None, as_json: bool) -> None:
    """Publish the decision, then wait (briefly) to see it acted on. Two decisions can race:
    another operator's, or the deadline sweep's. They share one idempotency key, so the agent
    acts on the first and skips the rest; this tells the operator which one that was."""
    from agentmesh.cli import EXIT_FAILED, emit_json, err, load_agents, out, run

    load_agents(module)
    result = run(_publish_decision(session, decision, reason))
    result["acted_on"] = run(_acted_on(result))
    won = result["acted_on"]["event_id"] in (None, result["event_id"])
    if as_json:
        emit_json(result)
    else:
        done = {"approve": "approved", "reject": "rejected"}[decision]
        out.print(
            f"{done} session {session} ({result['step']}) as {result['operator']}; "
            f"event {result['event_id']}"
        )
        if result["acted_on"]["event_id"] is None:
            err.print(f"note: {result['agent']} has not acted on it yet (is it running?)")
    if not won:
        other = result["acted_on"]
        err.print(
            f"error: another decision on this step was acted on first: {other['decision']} by "
            f"{other['operator']}; yours was skipped",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)


DECISION_WAIT_S = 10.0


async def _acted_on(result: dict[str, Any]) -> dict[str, Any]:
    """Which decision the waiting agent acted on: {event_id, decision, operator}, or
    event_id None if it has not acted within DECISION_WAIT_S."""
    import asyncio

    import asyncpg

    from agentmesh.cli import settings
    from agentmesh.schemas.approval import decision_key

    conn = await asyncpg.connect(settings().postgres_dsn)
    try:
        deadline = time.monotonic() + DECISION_WAIT_S
        key = decision_key(result["session_id"], result["step"])
        while True:
            acted = await conn.fetchval(
                "SELECT input_event_id::text FROM mesh_actions "
                "WHERE agent = $1 AND idempotency_key = $2",
                result["agent"],
                key,
            )
            if acted or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if acted is None or acted == result["event_id"]:
            return {"event_id": acted, "decision": result["decision"],
                    "operator": result["operator"]}  # fmt: skip
        raw = await conn.fetchval("SELECT envelope FROM mesh_outbox WHERE event_id = $1", acted)
        payload = json.loads(raw)["payload"] if raw else {}
        return {"event_id": acted, "decision": payload.get("decision", "?"),
                "operator": payload.get("operator", "?")}  # fmt: skip
    finally:
        await conn.close()


async def _publish_decision(session: str, decision: str, reason: str) -> dict[str, Any]:
    import asyncpg
    from redis.asyncio import Redis

    from agentmesh.bus import Streams
    from agentmesh.cli import EXIT_FAILED, fail, settings
    from agentmesh.outbox.operator import current_operator, record_operator_action
    from agentmesh.outbox.publish import publish_events
    from agentmesh.outbox.sessions import waiting_steps
    from agentmesh.schemas import registry
    from agentmesh.schemas.approval import decision_key

    s = settings()
    who = current_operator()
    conn = await asyncpg.connect(s.postgres_dsn)
    redis = Redis.from_url(s.redis_url)
    try:
        steps = await waiting_steps(conn, session_id=session)
        if not steps:
            fail(f"session {session!r} is not waiting for a decision", EXIT_FAILED)
        w = steps[-1]
        env = registry.make(
            w.decision_type,
            {
                "decision": decision,
                "operator": who,
                "reason": reason,
                "step": w.step,
                "context": w.context,
            },
            session_id=session,
            idempotency_key=decision_key(session, w.step),
            source=f"operator:{who}",
        )
        stream = registry.stream_of(w.decision_type)
        if not stream:
            fail(f"decision type {w.decision_type} has no stream", EXIT_FAILED)
        await record_operator_action(
            conn,
            operator=who,
            action=decision,
            reason=reason,
            target=f"{w.agent}:{w.step}",
            session_id=session,
            event_id=env.event_id,
            stream=stream,
        )
        bus = Streams(redis, group="-", consumer="-", dedup_ttl_s=s.dedup_ttl_s)
        await publish_events(conn, bus, [(stream, env)])
        return {
            "session_id": session,
            "decision": decision,
            "operator": who,
            "step": w.step,
            "agent": w.agent,
            "event_id": env.event_id,
            "reason": reason,
        }
    finally:
        await conn.close()
        await redis.aclose()
