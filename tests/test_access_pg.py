"""PostgreSQL roles from `mesh access pg-roles`, against the real server: each credential can
do its job and nothing else; an agent's role cannot write an operator action."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from agentmesh import devstack
from agentmesh.access import pg_roles
from agentmesh.cli.common import EXIT_FORBIDDEN
from agentmesh.outbox import outbox_rows
from agentmesh.outbox.operator import record_operator_action
from agentmesh.outbox.unit_of_work import UnitOfWork, Work
from agentmesh.schemas import registry
from tests.access_helpers import apply_roles, dsn_as, plan
from tests.conftest import eventually
from tests.helpers import job


@pytest.fixture
async def roles(stack: devstack.StackConfig, pg: asyncpg.Connection, tmp_path: Path):  # type: ignore[no-untyped-def]
    return await apply_roles(stack, tmp_path / "secrets")


async def test_every_table_is_classified(pg: asyncpg.Connection) -> None:
    """A migration that adds a table must say who may use it (pg_roles.TABLES)."""
    tables = {
        r["tablename"]
        for r in await pg.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert tables == set(pg_roles.TABLES)


async def test_agent_role_cannot_write_an_operator_action(stack, roles, pg) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(dsn_as(stack, "mesh_agent_finisher", roles))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="mesh_approve"):
            await record_operator_action(conn, operator="ava", action="approve", reason="",
                                         target="x", session_id="s-1")  # fmt: skip
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="mesh_dlq"):
            await record_operator_action(conn, operator="dan", action="dlq.drop", reason="",
                                         target="x", session_id="s-1")  # fmt: skip
        # an operator envelope under another type column: the check constraint refuses it
        env = registry.make(
            "mesh.operator",
            {"operator": "ava", "action": "approve", "reason": "", "target": "x"},
            session_id="s-1",
            source="finisher",
        )  # fmt: skip  (its own row, as far as RLS goes)
        rows = outbox_rows.OutboxRows()
        rows.add(None, env)
        params = rows.params()
        params[2] = ["job.done"]  # the type column
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(outbox_rows.INSERT_SQL, *params)
        # cannot mark rows published, prune them, or read the relay's tables
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE mesh_outbox SET published_at = now()")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM mesh_outbox")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM mesh_audit_index")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM mesh_actions")
    finally:
        await conn.close()
    assert await pg.fetchval("SELECT count(*) FROM mesh_outbox") == 0


async def test_agent_role_runs_its_unit_of_work(stack, roles, pg) -> None:  # type: ignore[no-untyped-def]
    """The grants are enough for the agent's own work: look-up, commit, stored handoffs."""
    pool = await asyncpg.create_pool(dsn_as(stack, "mesh_agent_worker", roles), min_size=1,
                                     max_size=2)  # fmt: skip
    assert pool is not None
    try:
        assert await pool.fetchval("SELECT session_user") == "mesh_agent_worker"
        uow = UnitOfWork(pool, "worker")
        inp = job(1)
        done = registry.make("job.done", {"n": 1}, session_id=inp.session_id)
        work = Work(idempotency_key=inp.idempotency_key, input=inp, stream="t:jobs",
                    entry_id="1-0", result={"n": 1}, handoffs=[("t:done", done)])  # fmt: skip
        res = await uow.commit([work])
        assert [w.idempotency_key for w in res.committed] == [inp.idempotency_key], res.failed
        stored = await uow.stored_handoffs([inp.idempotency_key])
        assert [o.event_id for o in stored[inp.idempotency_key]] == [done.event_id]
    finally:
        await pool.close()
    assert await pg.fetchval("SELECT count(*) FROM mesh_actions WHERE agent = 'worker'") == 1


async def test_read_only_operator_cannot_write(stack, roles, pg) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(dsn_as(stack, "rita", roles))
    try:
        assert await conn.fetchval("SELECT count(*) FROM mesh_actions") == 0  # may read
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await record_operator_action(conn, operator="rita", action="approve", reason="",
                                         target="x", session_id="s-1")  # fmt: skip
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE mesh_outbox SET published_at = NULL")
    finally:
        await conn.close()


async def test_printed_sql_has_no_password_and_apply_is_idempotent(stack, roles, tmp_path) -> None:  # type: ignore[no-untyped-def]
    printed = pg_roles.script(plan(), [], None)
    assert "PASSWORD" not in printed
    secret = roles.password("postgres", "mesh_agent_worker")
    with_verifiers = pg_roles.script(plan(), [], roles)
    assert "SCRAM-SHA-256$" in with_verifiers and secret not in with_verifiers
    again = await apply_roles(stack, tmp_path / "secrets")  # the same files: same passwords
    assert again.password("postgres", "mesh_agent_worker") == secret
    assert (tmp_path / "secrets" / "postgres" / "mesh_agent_worker").stat().st_mode & 0o077 == 0


async def test_relay_publishes_under_its_role(stack, roles, pg, relays) -> None:  # type: ignore[no-untyped-def]
    """The relay's grants are enough to send the outbox to Kafka and mark it (index, slots)."""
    env = registry.make("job.done", {"n": 1}, session_id="s-relay")
    rows = outbox_rows.OutboxRows()
    rows.add(None, env)
    await outbox_rows.insert(pg, rows, skip_existing=False)
    relay = relays(MESH_POSTGRES_DSN=dsn_as(stack, pg_roles.RELAY_LOGIN, roles))

    async def published() -> bool:
        return bool(await pg.fetchval("SELECT published_at IS NOT NULL FROM mesh_outbox"))

    await eventually(published, timeout=60, what="the row published by mesh_relay_user")
    assert await pg.fetchval("SELECT count(*) FROM mesh_audit_index") == 1
    assert relay.alive() and "permission denied" not in relay.log(), relay.log()


async def test_agent_role_sees_and_writes_only_its_own_rows(stack, roles, pg) -> None:  # type: ignore[no-untyped-def]
    """Row security: another agent's actions are invisible, and neither its rows nor a handoff
    onto a stream this agent does not emit can be written (an operator's redrive would later
    have put it onto Redis)."""
    pool = await asyncpg.create_pool(dsn_as(stack, "mesh_agent_worker", roles), min_size=1,
                                     max_size=1)  # fmt: skip
    assert pool is not None
    try:
        inp = job(1)
        done = registry.make("job.done", {"n": 1}, session_id=inp.session_id)
        work = Work(idempotency_key=inp.idempotency_key, input=inp, stream="t:jobs",
                    entry_id="1-0", result={}, handoffs=[("t:done", done)])  # fmt: skip
        res = await UnitOfWork(pool, "worker").commit([work])
        assert res.committed, res.failed
        # the same work under another agent's name: refused
        other = Work(idempotency_key="k-2", input=job(2), stream="t:jobs", entry_id="2-0")
        res = await UnitOfWork(pool, "finisher").commit([other])
        assert not res.committed and res.failed
        assert "row-level security" in str(res.failed[0][1])
        # a handoff row onto a stream worker does not emit (t:final is finisher's)
        forged = registry.make("job.final", {"n": 9}, session_id="s-x", source="worker")
        rows = outbox_rows.OutboxRows()
        rows.add("t:final", forged)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await outbox_rows.insert(pool, rows, skip_existing=False)
        # another agent's rows are not visible
        await pg.execute(
            "INSERT INTO mesh_actions (agent, idempotency_key, session_id, input_event_id, "
            "input_type, stream, entry_id) VALUES ('finisher', 'k-f', 's-f', gen_random_uuid(), "
            "'job.done', 't:done', '1-0')"
        )
        agents_seen = await pool.fetch("SELECT DISTINCT agent FROM mesh_actions")
        assert [r["agent"] for r in agents_seen] == ["worker"]
        # the outbox rows of a session it acted in (the publisher's first row included), not
        # of another session
        started = registry.make("job.created", {"n": 1}, session_id=inp.session_id)
        other_session = registry.make("job.created", {"n": 5}, session_id="s-other")
        for e in (started, other_session):
            first = outbox_rows.OutboxRows()
            first.add("t:jobs", e)
            await outbox_rows.insert(pg, first, skip_existing=False)
        visible = {r["session_id"] for r in await pool.fetch("SELECT session_id FROM mesh_outbox")}
        assert visible == {inp.session_id}
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM mesh_outbox WHERE event_id = $1::uuid", started.event_id
            )
            == 1
        )
    finally:
        await pool.close()
    assert await pg.fetchval("SELECT count(*) FROM mesh_actions") == 2  # worker's, finisher's


async def test_projector_folds_under_its_role_and_a_reader_queries_it(  # type: ignore[no-untyped-def]
    stack, roles, pg, audit_env, relays, tmp_path
) -> None:
    """`mesh projection run` creates and fills its table as mesh_projector_user; a read-only
    operator can query it (default privileges), and cannot rebuild it."""
    from tests.audit_helpers import backlog, event, insert
    from tests.conftest import MeshProcess
    from tests.helpers import mesh
    from tests.projection_fixture import reset

    await reset(pg)
    await insert(pg, [event(f"pr-{i % 3}", i) for i in range(12)])
    relays()

    async def drained() -> bool:
        return await backlog(pg) == 0

    await eventually(drained, timeout=60, what="the outbox in Kafka")
    module = "tests.projection_fixture"
    env = {**audit_env, "MESH_POSTGRES_DSN": dsn_as(stack, pg_roles.PROJECTOR_LOGIN, roles)}
    proc = MeshProcess(["projection", "run", "t_counts", "--module", module], "projection",
                       env, tmp_path)  # fmt: skip
    try:

        async def folded() -> bool:
            try:
                n = await pg.fetchval("SELECT sum(events) FROM t_counts")
            except asyncpg.UndefinedTableError:
                return False
            return n == 12

        await eventually(folded, timeout=90, what="the projection folded by its own role")
        owner = await pg.fetchval(
            "SELECT tableowner FROM pg_tables WHERE tablename LIKE 't\\_counts\\_g%'"
        )
        assert owner == pg_roles.PROJECTOR_LOGIN
        reader = {**audit_env, "MESH_POSTGRES_DSN": dsn_as(stack, "rita", roles)}
        out = await asyncio.to_thread(mesh, reader, "projection", "query", "t_counts", "all",
                                      "--module", module, "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert sum(r["events"] for r in json.loads(out.stdout)) == 12
        out = await asyncio.to_thread(mesh, reader, "projection", "rebuild", "t_counts",
                                      "--module", module)  # fmt: skip
        assert out.returncode == EXIT_FORBIDDEN, out.stdout + out.stderr
        assert "permission denied" in out.stderr
    finally:
        proc.close()
        await reset(pg)
