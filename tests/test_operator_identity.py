"""Operator identity comes from the credential, not from what the operator types: the database
stamps each operator action with the PostgreSQL role of its connection, and refuses an action
the role has no right to (read-only, approve, DLQ)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from agentmesh import Mesh, devstack
from agentmesh.access.secrets import Secrets
from agentmesh.cli.common import EXIT_FORBIDDEN
from agentmesh.outbox.operator import record_operator_action
from agentmesh.settings import Settings
from tests.access_helpers import apply_roles, dsn_as
from tests.decision_fixture import DECISION_TYPE
from tests.helpers import mesh


@pytest.fixture
async def roles(stack: devstack.StackConfig, pg: asyncpg.Connection, tmp_path: Path) -> Secrets:
    return await apply_roles(stack, tmp_path / "secrets")


def settings_as(stack: devstack.StackConfig, role: str, sec: Secrets) -> Settings:
    return Settings(redis_url=stack.redis_url, postgres_dsn=dsn_as(stack, role, sec))


async def waiting_session(pg: asyncpg.Connection, session: str) -> None:
    """A step waiting on a decision, as an agent's unit of work would have stored it."""
    result = {"waiting": {"step": "ok", "decision_type": DECISION_TYPE, "deadline": 9e9,
                          "context": {}}}  # fmt: skip
    await pg.execute(
        "INSERT INTO mesh_actions (agent, idempotency_key, session_id, input_event_id, "
        "input_type, stream, entry_id, result) VALUES ('waiter', $1, $2, gen_random_uuid(), "
        "'job.created', 't:jobs', '1-0', $3::jsonb)",
        f"k-{session}",
        session,
        json.dumps(result),
    )


async def operator_rows(pg: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await pg.fetch(
        "SELECT agent, envelope FROM mesh_outbox WHERE type = 'mesh.operator' ORDER BY id"
    )
    return [{"agent": r["agent"], **json.loads(r["envelope"])} for r in rows]


async def dead_letter(redis: Redis) -> str:
    fields = {"envelope": b"{broken", "stream": "t:jobs", "entry_id": "1-0", "group": "worker",
              "reason": "malformed_json"}  # fmt: skip
    entry_id = await redis.xadd("mesh:dlq", fields)  # type: ignore[arg-type]
    return entry_id.decode()


async def test_each_action_is_recorded_under_the_role_that_took_it(  # type: ignore[no-untyped-def]
    stack, roles, pg, redis
) -> None:
    await waiting_session(pg, "s-approve")
    async with Mesh(settings_as(stack, "ava", roles), operator="mallory") as m:
        outcome = await m.approve("s-approve", reason="fine")
    assert outcome.operator == "ava"
    dlq_id = await dead_letter(redis)
    async with Mesh(settings_as(stack, "dan", roles), operator="ava") as m:
        (dropped,) = await m.dlq.drop(await m.dlq.select(dlq_id), reason="junk")
    assert dropped.done
    ops = await operator_rows(pg)
    assert [(o["payload"]["action"], o["payload"]["operator"], o["agent"], o["source"])
            for o in ops] == [
        ("approve", "ava", "operator:ava", "operator:ava"),
        ("dlq.drop", "dan", "operator:dan", "operator:dan"),
    ]  # fmt: skip
    # the decision itself carries the same identity
    (decision,) = await redis.xrange("t:decisions")
    assert json.loads(decision[1][b"envelope"])["payload"]["operator"] == "ava"


async def test_a_typed_name_is_never_the_identity(stack, roles, pg) -> None:  # type: ignore[no-untyped-def]
    """A client that writes another operator's name into the row is recorded as itself; the
    name it typed is kept only as `claimed_by`."""
    conn = await asyncpg.connect(dsn_as(stack, "dan", roles))
    try:
        stored = await record_operator_action(
            conn, operator="ava", action="dlq.retry", reason="", target="1-0", session_id="s-1"
        )
    finally:
        await conn.close()
    assert stored.payload["operator"] == "dan"
    assert stored.payload["detail"]["claimed_by"] == "ava"
    (row,) = await operator_rows(pg)
    assert row["payload"]["operator"] == "dan" and row["agent"] == "operator:dan"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="cannot be changed"):
        await pg.execute("UPDATE mesh_outbox SET agent = 'operator:ava'")  # even by the owner


async def test_read_only_role_cannot_approve(stack, roles, pg, redis) -> None:  # type: ignore[no-untyped-def]
    await waiting_session(pg, "s-ro")
    async with Mesh(settings_as(stack, "rita", roles)) as m:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="mesh_approve"):
            await m.approve("s-ro", reason="me too")
        assert [s.session_id for s in await m.sessions(status="waiting")] == ["s-ro"]  # reads
    assert await operator_rows(pg) == []
    assert await redis.xlen("t:decisions") == 0  # nothing published either


async def test_cli_says_which_right_is_missing(stack, roles, base_env, pg, redis) -> None:  # type: ignore[no-untyped-def]
    env = {**base_env, "MESH_AGENTS_MODULE": "tests.decision_fixture"}
    rita = {**env, "MESH_POSTGRES_DSN": dsn_as(stack, "rita", roles)}
    ava = {**env, "MESH_POSTGRES_DSN": dsn_as(stack, "ava", roles)}
    await waiting_session(pg, "s-cli")
    r = await asyncio.to_thread(mesh, rita, "approve", "s-cli", "--reason", "x")
    assert r.returncode == EXIT_FORBIDDEN, r.stderr
    assert "permission denied" in r.stderr and "mesh_approve" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    dlq_id = await dead_letter(redis)
    r = await asyncio.to_thread(mesh, ava, "dlq", "drop", dlq_id, "--reason", "x")
    assert r.returncode == EXIT_FORBIDDEN, (r.stdout, r.stderr)
    assert "mesh_dlq" in r.stderr, r.stderr
    assert await redis.xlen("mesh:dlq") == 1  # still there
    assert await operator_rows(pg) == []
