"""Replaying sessions from Kafka, republish and redrive: real agents, relay and broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg
from redis.asyncio import Redis

from agentmesh import devstack
from agentmesh.outbox.replay import Until, replay_session
from tests.access_helpers import operator_env
from tests.audit_helpers import backlog, read_topic, settings_from
from tests.conftest import AgentProcess, MeshProcess, eventually
from tests.helpers import mesh, stream_events

Start = Callable[..., AgentProcess]
StartRelay = Callable[..., MeshProcess]


async def run_chain(
    env: dict[str, str], redis: Redis, pg: asyncpg.Connection, sessions: list[str]
) -> None:
    """job.created (via `mesh publish`) -> worker -> job.done -> finisher -> job.final."""
    for i, session in enumerate(sessions):
        out = await asyncio.to_thread(
            mesh, env, "publish", "t:jobs", "-t", "job.created", "-s", session,
            "-p", json.dumps({"n": i}),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    await eventually(
        lambda: _len_is(redis, "t:final", len(sessions)), timeout=60, what="job.final events"
    )
    await eventually(lambda: _drained(pg), timeout=60, what="outbox published")


async def _len_is(redis: Redis, stream: str, n: int) -> bool:
    return len(await stream_events(redis, stream)) == n


async def _drained(pg: asyncpg.Connection) -> bool:
    return await backlog(pg) == 0


def summary_of(events: list[Any]) -> list[tuple[str, str]]:
    return [(e.envelope.source, e.envelope.type) for e in events]


async def test_replay_shows_exactly_the_recorded_actions_in_order_and_survives_restart(
    redis: Redis,
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    audit_env: dict[str, str],
    agents: Start,
    relays: StartRelay,
) -> None:
    s = settings_from(audit_env)
    agents("worker")
    agents("finisher")
    relays()
    sessions = ["chain-a", "chain-b", "chain-c"]
    await run_chain(audit_env, redis, pg, sessions)

    rep = await replay_session(s, "chain-b")
    assert rep.used_index and rep.duplicates == 0 and rep.unpublished == 0
    assert [t for _, t in summary_of(rep.events)] == [
        "job.created", "mesh.action", "job.done", "mesh.action", "job.final",
    ]  # fmt: skip
    # the actions in the log are exactly those PostgreSQL recorded, in the same order
    recorded = await pg.fetch(
        """SELECT agent, input_event_id::text AS input, input_type, result
           FROM mesh_actions WHERE session_id = 'chain-b' ORDER BY id"""
    )
    replayed = [e.envelope.payload for e in rep.events if e.envelope.type == "mesh.action"]
    assert [(p["agent"], p["input_event_id"], p["input_type"], p["result"]) for p in replayed] == [
        (r["agent"], r["input"], r["input_type"], json.loads(r["result"])) for r in recorded
    ]
    # each event's cause precedes it
    ids = [e.envelope.event_id for e in rep.events]
    for i, e in enumerate(rep.events):
        if e.envelope.causation_id:
            assert ids.index(e.envelope.causation_id) < i

    # time travel: up to an event id, and up to a point in time
    done = rep.events[2].envelope
    cut = await replay_session(s, "chain-b", until=Until(event_id=done.event_id))
    assert [e.envelope.event_id for e in cut.events] == ids[:3]
    assert cut.stopped_at == done.event_id
    at = await replay_session(s, "chain-b", until=Until(time=rep.events[0].envelope.created_at))
    assert [e.envelope.event_id for e in at.events] == ids[:1]

    # the scan without the index finds the same, reading the whole partition
    scanned = await replay_session(s, "chain-b", use_index=False)
    assert [e.envelope.event_id for e in scanned.events] == ids
    assert not scanned.used_index and scanned.records_read >= rep.records_read

    # the broker restarts (kill -9): its file-backed storage still has the session
    devstack.kill9(stack, "kafka")
    devstack.up(stack, ("kafka",))
    again = await replay_session(s, "chain-b")
    assert [e.envelope.event_id for e in again.events] == ids

    # the CLI: JSON lines, the readable timeline, --until and --state
    out = await asyncio.to_thread(mesh, audit_env, "replay", "chain-b", "--json", "--state")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["event_id"] for e in lines[:-1]] == ids
    assert lines[-1] == {"state": {"n": 1, "status": "final"}}
    out = await asyncio.to_thread(mesh, audit_env, "replay", "chain-b", "--until", done.event_id)
    assert out.returncode == 0, out.stderr
    assert "handled job.created → emitted job.done" in out.stdout
    assert "job.final" not in out.stdout and "as --until asked" in out.stdout


async def test_republish_and_redrive_resend_and_readers_dedup(
    redis: Redis,
    pg: asyncpg.Connection,
    audit_env: dict[str, str],
    agents: Start,
    relays: StartRelay,
) -> None:
    s = settings_from(audit_env)
    agents("worker")
    agents("finisher")
    relays()
    await run_chain(audit_env, redis, pg, ["rp-1", "rp-2"])
    before = await replay_session(s, "rp-1")

    out = await asyncio.to_thread(mesh, audit_env, "relay", "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["backlog_rows"] == 0 and status["slots"] == 4 and status["slots_owned"] == 4
    assert len(status["relays"]) == 1
    out = await asyncio.to_thread(mesh, audit_env, "replay", "no-such-session")
    assert out.returncode == 1 and "no events for session 'no-such-session'" in out.stderr

    # republish one session: Kafka gets a second copy of each of its 5 events, and the
    # operator's request is itself in the session's log
    alice = await operator_env(audit_env, "alice")  # her PostgreSQL role
    out = await asyncio.to_thread(
        mesh, alice, "outbox", "republish", "--session", "rp-1", "--reason", "topic lost", "--json"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"matched": 5, "sent": 5, "skipped": 0, "remaining": 0}

    async def replayed_with_operator() -> Any:
        rep = await replay_session(s, "rp-1")
        return rep if len(rep.events) == 6 else None

    after = await eventually(replayed_with_operator, what="republish recorded in the log")
    copies = [r for r in await read_topic(s) if r.key == b"rp-1"]
    assert len(copies) == 11  # 5 events twice, the operator's action once
    assert [e.envelope.event_id for e in after.events[:5]] == [
        e.envelope.event_id for e in before.events
    ]
    assert after.duplicates == 5
    op = after.events[5].envelope
    assert op.type == "mesh.operator" and op.payload["operator"] == "alice"
    assert op.payload["action"] == "outbox.republish" and op.payload["reason"] == "topic lost"

    # Redis loses the handoff streams (and their dedup keys) of its last second
    finals = len(await stream_events(redis, "t:final"))
    for key in [k async for k in redis.scan_iter("mesh:dedup:t:done:*")]:
        await redis.delete(key)
    await redis.delete("t:done")
    out = await asyncio.to_thread(
        mesh, audit_env, "outbox", "redrive", "--session", "rp-1", "--json"
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    # job.created (t:jobs) and job.final (t:final) are still there; job.done goes again
    assert res == {"matched": 3, "sent": 1, "skipped": 2, "remaining": 0}
    (redriven,) = await stream_events(redis, "t:done")
    assert redriven.event_id == before.events[2].envelope.event_id
    # the finisher sees it again: it is a duplicate, no second action and no second job.final
    await eventually(lambda: _group_done(redis), what="finisher acked the redriven entry")
    n = await pg.fetchval("SELECT count(*) FROM mesh_actions WHERE agent = 'finisher'")
    assert n == 2
    assert len(await stream_events(redis, "t:final")) == finals
    ops = await pg.fetch(
        "SELECT session_id, envelope FROM mesh_outbox WHERE type = 'mesh.operator' ORDER BY id"
    )
    assert [(r["session_id"], json.loads(r["envelope"])["payload"]["action"]) for r in ops] == [
        ("rp-1", "outbox.republish"),
        ("rp-1", "outbox.redrive"),
    ]

    # --since covers both sessions: rp-2's job.done was lost with the stream too
    out = await asyncio.to_thread(
        mesh, audit_env, "outbox", "redrive", "--since", "2000-01-01T00:00:00Z"
    )
    assert out.returncode == 0, out.stderr
    assert "redrove 1 of 6 handoffs onto their streams (5 were still there)" in out.stdout
    await eventually(lambda: _group_done(redis), what="finisher acked rp-2's job.done")
    n = await pg.fetchval("SELECT count(*) FROM mesh_actions WHERE agent = 'finisher'")
    assert n == 2 and len(await stream_events(redis, "t:final")) == finals
    last = await pg.fetchrow(
        "SELECT session_id, envelope FROM mesh_outbox WHERE type = 'mesh.operator' "
        "ORDER BY id DESC LIMIT 1"
    )
    assert last["session_id"] == "operator"  # many sessions: filed under the operator's own
    assert json.loads(last["envelope"])["payload"]["target"].startswith("since 2000-01-01")


async def _group_done(redis: Redis) -> bool:
    groups = await redis.xinfo_groups("t:done")
    return bool(groups) and groups[0]["pending"] == 0 and groups[0]["lag"] == 0


async def test_replay_cli_errors_are_one_line_with_meaningful_exit_codes(
    pg: asyncpg.Connection, audit_env: dict[str, str], relays: StartRelay
) -> None:
    out = await asyncio.to_thread(mesh, audit_env, "replay", "nobody", "--until", "yesterday")
    assert out.returncode == 2 and "neither an event id nor an ISO time" in out.stderr
    assert "Traceback" not in out.stderr
    down = {**audit_env, "MESH_KAFKA_BOOTSTRAP": f"127.0.0.1:{devstack.free_port()}"}
    out = await asyncio.to_thread(mesh, down, "replay", "nobody")
    assert out.returncode == 3 and "Kafka" in out.stderr and "Traceback" not in out.stderr
    out = await asyncio.to_thread(mesh, audit_env, "outbox", "redrive")
    assert out.returncode == 2 and "exactly one of --session or --since" in out.stderr


async def test_replay_of_a_long_lived_session_reads_its_ranges_not_its_partition(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    """A session whose events are far apart in its partition: the index keeps one range per
    cluster, so replay reads the session's records, not the thousands in between."""
    from agentmesh.outbox.kafka import session_hash
    from tests.audit_helpers import drain_outbox, event, insert

    s = settings_from(audit_env)
    target = session_hash("long") % 4
    fillers = [f"f-{i}" for i in range(200) if session_hash(f"f-{i}") % 4 == target][:5]
    rows = []
    for k in range(6):
        rows.append(event("long", k))
        rows += [event(fillers[j % len(fillers)], k * 1000 + j) for j in range(700)]
    await insert(pg, rows)
    await drain_outbox(s, pg)
    ranges = await pg.fetch(
        "SELECT first_offset, last_offset FROM mesh_audit_index WHERE session_id = 'long'"
    )
    assert len(ranges) == 6 and all(r["first_offset"] == r["last_offset"] for r in ranges)
    rep = await replay_session(s, "long")
    assert [e.envelope.payload["n"] for e in rep.events] == list(range(6))
    assert rep.records_read < 50  # the 4,200 records around them are not read
    scanned = await replay_session(s, "long", use_index=False)
    assert [e.envelope.event_id for e in scanned.events] == [
        e.envelope.event_id for e in rep.events
    ]
    assert scanned.records_read >= 4200
