"""DLQ drain end to end, with a real agent, Postgres, Redis and Kafka: a poison message is
dead-lettered with its reason, refused for retry until it is fixed, edited, re-driven, handled
once, and the audit log (replayed from Kafka) shows who did what and why."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import asyncpg
from redis.asyncio import Redis

from tests.audit_helpers import drain_outbox, settings_from
from tests.conftest import AgentProcess, eventually
from tests.helpers import job, mesh


async def _dlq_ids(env: dict[str, str]) -> list[dict[str, object]]:
    r = await asyncio.to_thread(mesh, env, "dlq", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, object]] = json.loads(r.stdout)
    return rows


async def _handled(pg: asyncpg.Connection, event_id: str) -> bool:
    n = await pg.fetchval(
        "SELECT count(*) FROM mesh_actions WHERE input_event_id = $1::uuid", event_id
    )
    return bool(n)


async def test_poison_ticket_is_edited_retried_and_audited(
    redis: Redis,
    pg: asyncpg.Connection,
    audit_env: dict[str, str],
    agents: Callable[..., AgentProcess],
) -> None:
    env = {**audit_env, "MESH_OPERATOR": "alice"}
    good = job(7, session="s-drain")
    poison = json.loads(good.to_json())
    poison["payload"] = {"n": "seven"}  # fails the Job schema
    await redis.xadd("t:jobs", {"envelope": json.dumps(poison)})
    agents("worker")

    async def dead_lettered() -> bool:
        return len(await _dlq_ids(env)) == 1

    await eventually(dead_lettered, timeout=30, what="the poison message in the DLQ")
    (row,) = await _dlq_ids(env)
    dlq_id = str(row["id"])
    assert row["session_id"] == "s-drain" and row["event_type"] == "job.created"
    assert row["stream"] == "t:jobs" and row["agent"] == "worker" and row["reason"]

    refused = await asyncio.to_thread(mesh, env, "dlq", "retry", dlq_id, "--json")
    assert refused.returncode == 1 and "fix it with mesh dlq edit" in refused.stdout
    bad_edit = await asyncio.to_thread(
        mesh, env, "dlq", "edit", dlq_id, "--payload", '{"n": "still"}'
    )
    assert bad_edit.returncode == 2 and "still invalid" in bad_edit.stderr

    edited = await asyncio.to_thread(
        mesh, env, "dlq", "edit", dlq_id, "--payload", '{"n": 7}', "--reason", "typo", "--json"
    )
    assert edited.returncode == 0, edited.stderr
    new_id = json.loads(edited.stdout)["new_id"]
    retried = await asyncio.to_thread(
        mesh, env, "dlq", "retry", new_id, "--reason", "fixed the typo", "--json"
    )
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)[0]["done"] is True

    await eventually(lambda: _handled(pg, good.event_id), timeout=30, what="the fixed message")
    again = await asyncio.to_thread(mesh, env, "dlq", "retry", new_id)
    assert again.returncode == 1 and "no DLQ entry" in again.stderr
    assert await _dlq_ids(env) == []
    await asyncio.sleep(1)
    assert int(await redis.get(f"t:runs:{good.event_id}") or 0) == 1

    await drain_outbox(settings_from(env), pg)
    replay = await asyncio.to_thread(mesh, env, "replay", "s-drain", "--json")
    assert replay.returncode == 0, replay.stderr
    events = [json.loads(line) for line in replay.stdout.splitlines()]
    operator = [e for e in events if e["type"] == "mesh.operator"]
    assert [
        (e["payload"]["action"], e["payload"]["operator"], e["payload"]["reason"]) for e in operator
    ] == [
        ("dlq.edit", "alice", "typo"),
        ("dlq.retry", "alice", "fixed the typo"),
    ]
    assert operator[0]["payload"]["detail"]["after"] == {"n": 7}
    types = [e["type"] for e in events]
    assert types.index("mesh.operator") < types.index("mesh.action")  # re-driven, then handled


async def test_an_envelope_without_event_id_is_fixed_whole_with_envelope(
    redis: Redis,
    pg: asyncpg.Connection,
    base_env: dict[str, str],
    agents: Callable[..., AgentProcess],
) -> None:
    env = {**base_env, "MESH_OPERATOR": "carol"}
    good = job(8, session="s-noid")
    no_id = json.loads(good.to_json())
    del no_id["event_id"], no_id["idempotency_key"]  # a producer that forgot the id
    await redis.xadd("t:jobs", {"envelope": json.dumps(no_id)})
    agents("worker")

    async def dead_lettered() -> bool:
        return len(await _dlq_ids(env)) == 1

    await eventually(dead_lettered, timeout=30, what="the id-less message in the DLQ")
    (row,) = await _dlq_ids(env)
    assert row["reason"] == "malformed_envelope" and "event_id" in str(row["error"])
    dlq_id = str(row["id"])
    payload_only = await asyncio.to_thread(
        mesh, env, "dlq", "edit", dlq_id, "--payload", '{"n": 8}'
    )
    assert payload_only.returncode == 2 and "event_id" in payload_only.stderr
    both = await asyncio.to_thread(
        mesh, env, "dlq", "edit", dlq_id, "--payload", "{}", "--envelope", "{}"
    )
    assert both.returncode == 2 and "not both" in both.stderr

    fixed = {**no_id, "event_id": good.event_id}
    edit = ["dlq", "edit", dlq_id, "--envelope", json.dumps(fixed), "--reason", "gave it an id"]
    edited = await asyncio.to_thread(mesh, env, *edit, "--json")
    assert edited.returncode == 0, edited.stderr
    new_id = json.loads(edited.stdout)["new_id"]
    retried = await asyncio.to_thread(mesh, env, "dlq", "retry", new_id, "--json")
    assert retried.returncode == 0, retried.stdout + retried.stderr

    await eventually(lambda: _handled(pg, good.event_id), timeout=30, what="the repaired one")
    audit = await pg.fetchval(
        "SELECT envelope FROM mesh_outbox WHERE type = 'mesh.operator' AND session_id = 's-noid' "
        "AND envelope::jsonb->'payload'->>'action' = 'dlq.edit'"
    )
    detail = json.loads(audit)["payload"]["detail"]
    assert detail["envelope_fields_changed"]["event_id"] == [None, good.event_id]
    assert json.loads(audit)["payload"]["operator"] == "carol"


async def test_drop_requires_a_reason_and_filters_select(
    redis: Redis, pg: asyncpg.Connection, base_env: dict[str, str]
) -> None:
    from tests.test_dlq_cli import _dead_letter

    env = {**base_env, "MESH_OPERATOR": "bob"}
    ids = await _dead_letter(redis)
    no_reason = mesh(env, "dlq", "drop", ids[0])
    assert no_reason.returncode == 2 and "Traceback" not in no_reason.stderr
    nothing = mesh(env, "dlq", "drop", "--reason", "x")
    assert nothing.returncode == 2 and "exactly one" in nothing.stderr
    dropped = mesh(env, "dlq", "drop", "--agent", "worker", "--reason", "junk test data", "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert [o["id"] for o in json.loads(dropped.stdout)] == ids[:1]
    assert [r["id"] for r in json.loads(mesh(env, "dlq", "list", "--json").stdout)] == ids[1:]
    rows = await pg.fetch(
        "SELECT session_id, envelope FROM mesh_outbox WHERE type = 'mesh.operator' ORDER BY id"
    )
    payloads = [json.loads(r["envelope"])["payload"] for r in rows]
    assert [(p["action"], p["operator"], p["reason"], p["target"]) for p in payloads][-1] == (
        "dlq.drop",
        "bob",
        "junk test data",
        ids[0],
    )
    assert rows[-1]["session_id"] == "operator"  # its envelope was unreadable
    # that entry names t:other, but job.created travels on t:jobs: a retry does not move a
    # planted entry to another stream; it is refused, reported, and stays
    table = mesh(env, "dlq", "retry", "--all")
    assert table.returncode == 1 and "0 of 1 retried" in table.stdout, table.stdout
    assert "refused" in table.stdout and "travels on" in table.stdout

    # a message of a session that agents acted in and that has not ended: dropping it would
    # strand the session (a payment after its hold was placed), so only --force drops it
    await pg.execute(
        "INSERT INTO mesh_actions (agent, idempotency_key, session_id, input_event_id, "
        "input_type, stream, entry_id) VALUES ('finisher', 'k-open', 's-dlq', "
        "gen_random_uuid(), 'job.created', 't:other', '1-0')"
    )
    ids = await _dead_letter(redis)
    refused = mesh(env, "dlq", "drop", ids[1], "--reason", "stale")
    assert refused.returncode == 1 and "still open" in refused.stdout, refused.stdout
    forced = mesh(env, "dlq", "drop", ids[1], "--reason", "stale", "--force", "--json")
    assert forced.returncode == 0 and json.loads(forced.stdout)[0]["done"], forced.stderr
