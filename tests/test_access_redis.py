"""Redis ACL users from `mesh access redis-acl`, against the real server: an agent's user runs
its agent end to end (read, commit, hand off, dead-letter, trim, heartbeat) and can write
nothing it does not declare; operator users can do their kind of work only."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

import tests.decision_fixture  # noqa: F401  (the plan has a decision stream)
from agentmesh import devstack
from agentmesh.access import redis_acl
from agentmesh.access.secrets import Secrets
from agentmesh.bus import Outgoing, Streams
from agentmesh.bus import dlq as dlq_steps
from agentmesh.schemas import registry
from tests.access_helpers import apply_roles, dsn_as, dsn_with_user, plan, redis_url_as
from tests.audit_helpers import metric
from tests.conftest import AgentProcess, eventually
from tests.helpers import dlq, mesh, stream_events


@pytest.fixture
async def acl(stack: devstack.StackConfig, redis: Redis, pg: asyncpg.Connection,
              tmp_path: Path) -> Secrets:  # fmt: skip
    sec = await apply_roles(stack, tmp_path / "secrets")  # same secrets dir: pg roles too
    await redis_acl.apply(redis, redis_acl.users_for(plan()), sec)
    return sec


@pytest.fixture
async def as_user(
    stack: devstack.StackConfig, acl: Secrets
) -> AsyncIterator[Callable[[str], Redis]]:
    opened: list[Redis] = []

    def connect(user: str) -> Redis:
        client = Redis.from_url(redis_url_as(stack, user, acl))
        opened.append(client)
        return client

    yield connect
    for c in opened:
        await c.aclose()


async def test_agent_runs_end_to_end_under_its_own_credentials(  # type: ignore[no-untyped-def]
    stack, acl, redis, pg, agents
) -> None:
    """finisher: job.done (t:done) -> job.final (t:final), with its ACL user and its role."""
    proc: AgentProcess = agents(
        "finisher",  # its credentials as a deployment gives them: user names, password files
        MESH_REDIS_USERNAME="mesh-agent-finisher",
        MESH_REDIS_PASSWORD_FILE=str(acl.path("redis", "mesh-agent-finisher")),
        MESH_POSTGRES_DSN=dsn_with_user(stack.postgres_dsn, "mesh_agent_finisher"),
        MESH_POSTGRES_PASSWORD_FILE=str(acl.path("postgres", "mesh_agent_finisher")),
        MESH_TRIM_INTERVAL_S="0.5",
    )
    ok = registry.make("job.done", {"n": 7}, session_id="s-acl")
    bus = Streams(redis, group="-", consumer="-")
    await bus.publish([Outgoing("t:done", ok.event_id, ok.to_wire())])
    await redis.xadd("t:done", {"envelope": b"{not json"})  # poison: to the DLQ, by the agent

    async def handed_off() -> bool:
        return [e.payload["n"] for e in await stream_events(redis, "t:final")] == [7]

    async def connected_as_its_user() -> bool:
        users = {c.get("user") for c in await redis.client_list()}
        return "mesh-agent-finisher" in users

    await eventually(connected_as_its_user, what="the agent connected as mesh-agent-finisher")
    await eventually(handed_off, what="finisher's handoff onto t:final")
    await eventually(lambda: dlq(redis), what="the poison entry in the DLQ")
    assert (await dlq(redis))[0]["agent"] == "finisher"
    assert await pg.fetchval("SELECT count(*) FROM mesh_actions WHERE agent = 'finisher'") == 1

    async def all_acked() -> bool:
        groups = await redis.xinfo_groups("t:done")
        return any(g["name"] == b"finisher" and g["pending"] == 0 for g in groups)

    await eventually(all_acked, what="both entries acked")
    assert proc.alive()
    pass_done = "a housekeeping pass under the ACL user (it reads the DLQ depth)"
    await eventually(lambda: _metrics_show_dlq_depth(proc), what=pass_done)
    log = proc.log().lower()
    for refused in ("noperm", "no permissions", "permission denied", "loop error"):
        assert refused not in log, proc.log()


async def _metrics_show_dlq_depth(proc: AgentProcess) -> bool:
    """The agent's /metrics carries mesh_dlq_depth 1 (read with its own ACL user)."""
    port = re.search(r"http_port=(\d+)", proc.log())
    return bool(port) and await metric(int(port.group(1)), "mesh_dlq_depth") == 1


async def test_agent_cannot_write_a_stream_it_does_not_emit(as_user, redis) -> None:  # type: ignore[no-untyped-def]
    finisher = as_user("mesh-agent-finisher")
    with pytest.raises(NoPermissionError):
        await finisher.xadd("t:jobs", {"envelope": b"{}"})  # another agent's input
    with pytest.raises(NoPermissionError):
        await finisher.xadd("t:done", {"envelope": b"{}"})  # its own input
    with pytest.raises(NoPermissionError):
        await finisher.xadd("t:decisions", {"envelope": b"{}"})
    bus = Streams(finisher, group="finisher", consumer="c")
    with pytest.raises(NoPermissionError):  # the Lua path checks every key it touches too
        await bus.publish([Outgoing("t:done", "e-1", b"{}")])
    with pytest.raises(NoPermissionError):
        await bus.publish([Outgoing("t:final", "e-2", b"{}"), Outgoing("t:jobs", "e-3", b"{}")])
    assert await redis.xlen("t:final") == 0  # the mixed batch was refused whole
    assert await bus.publish([Outgoing("t:final", "e-4", b"{}")]) != [None]  # declared: fine
    with pytest.raises(NoPermissionError):  # nor read another agent's stream or keys
        await finisher.xreadgroup("worker", "c", {"t:jobs": ">"})
    with pytest.raises(NoPermissionError):
        await finisher.get("t:runs:x")
    with pytest.raises(NoPermissionError):
        await finisher.delete("t:done")
    with pytest.raises(NoPermissionError):
        await finisher.set("mesh:breakers:worker-h-1-x", "{}")  # another agent's report
    with pytest.raises(NoPermissionError):
        await finisher.flushall()


async def test_operator_users_do_their_kind_of_work(as_user, redis) -> None:  # type: ignore[no-untyped-def]
    await redis.xadd("t:jobs", {"envelope": b"{}"})
    reader, approver, fixer = as_user("mesh-read"), as_user("mesh-approve"), as_user("mesh-dlq")
    assert await reader.xlen("t:jobs") == 1
    for client in (reader, approver):
        with pytest.raises(NoPermissionError):
            await client.xadd("t:jobs", {"envelope": b"{}"})
    with pytest.raises(NoPermissionError):
        await reader.xadd("t:decisions", {"envelope": b"{}"})
    decided = Streams(approver, group="-", consumer="-")
    assert await decided.publish([Outgoing("t:decisions", "d-1", b"{}")]) != [None]
    with pytest.raises(NoPermissionError):  # approve cannot work the DLQ
        await approver.xdel("mesh:dlq", "1-0")
    dlq_id = (await redis.xadd("mesh:dlq", {"envelope": b"{}", "stream": "t:jobs"})).decode()
    new_id = await dlq_steps.retry(fixer, dlq_stream="mesh:dlq", dlq_id=dlq_id,
                                   stream="t:jobs", group="worker", entry_id="1-0",
                                   envelope=b"{}")  # fmt: skip
    assert new_id is not None and await redis.xlen("mesh:dlq") == 0
    with pytest.raises(NoPermissionError):  # ... but only onto registered streams
        await fixer.xadd("somewhere:else", {"envelope": b"{}"})


async def test_cli_prints_hashes_never_passwords(stack, base_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secrets_dir = tmp_path / "cli-secrets"
    r = await asyncio.to_thread(
        mesh, base_env, "access", "redis-acl", "--secrets-dir", str(secrets_dir)
    )
    assert r.returncode == 0, r.stderr
    sec = Secrets(secrets_dir)
    for user in ("mesh-agent-worker", "mesh-agent-finisher", "mesh-read", "mesh-dlq"):
        password = sec.password("redis", user)  # generated by the command, in its file
        assert password not in r.stdout
        assert f"#{redis_acl.redis_hash(password)}" in r.stdout
        assert (secrets_dir / "redis" / user).stat().st_mode & 0o077 == 0
    r = await asyncio.to_thread(mesh, base_env, "access", "redis-acl", "--apply",
                                "--secrets-dir", str(secrets_dir))  # fmt: skip
    assert r.returncode == 0, r.stderr
    client = Redis.from_url(redis_url_as(stack, "mesh-agent-worker", sec))
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_dev_up_creates_the_users_and_roles(stack, base_env, redis, pg) -> None:  # type: ignore[no-untyped-def]
    """`mesh dev up` (on the running stack: idempotent) creates every agent's user and role,
    and the default user keeps working (the rest of the suite runs on it)."""
    await redis.execute_command("ACL", "DELUSER", "mesh-agent-caller")  # type: ignore[no-untyped-call]
    await pg.execute("DROP ROLE IF EXISTS mesh_agent_caller")  # made by the other tests too
    env = {**base_env, "MESH_DEV_ROOT": str(stack.root)}
    r = await asyncio.to_thread(mesh, env, "dev", "up", "redis", "postgres")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "least-privilege users" in r.stdout
    sec = Secrets(stack.root / "secrets")
    caller = Redis.from_url(redis_url_as(stack, "mesh-agent-caller", sec))
    try:
        assert await caller.ping()
        with pytest.raises(NoPermissionError):
            await caller.xadd("t:jobs", {"envelope": b"{}"})
    finally:
        await caller.aclose()
    conn = await asyncpg.connect(dsn_as(stack, "mesh_agent_caller", sec))
    try:
        assert await conn.fetchval("SELECT session_user") == "mesh_agent_caller"
    finally:
        await conn.close()
    assert await redis.ping()  # the default user


async def test_an_aclfile_loads_into_a_fresh_redis(tmp_path: Path) -> None:
    """`--aclfile` output is what redis-server --aclfile accepts (selectors included)."""
    sec = Secrets(tmp_path / "s")
    users = redis_acl.users_for(plan())
    acl_file = tmp_path / "users.acl"
    lines = [*redis_acl.aclfile_lines(users, sec), "user default on nopass ~* &* +@all"]
    acl_file.write_text("\n".join(lines) + "\n")
    port = devstack.free_port()
    server = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--aclfile", str(acl_file), "--dir", str(tmp_path),
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    admin = Redis.from_url(url)
    try:

        async def up() -> bool:
            try:
                return bool(await admin.ping())
            except Exception:
                return False

        await eventually(up, what="redis-server with the aclfile")
        names = {u.decode() for u in await admin.execute_command("ACL", "USERS")}  # type: ignore[no-untyped-call]
        assert {u.name for u in users} <= names
        worker = Redis.from_url(url, username="mesh-agent-worker",
                                password=sec.password("redis", "mesh-agent-worker"))  # fmt: skip
        try:
            assert await Streams(worker, group="-", consumer="-").publish(
                [Outgoing("t:done", "e-1", b"{}")]
            ) != [None]
            with pytest.raises(NoPermissionError):
                await worker.xadd("t:final", {"envelope": b"{}"})
        finally:
            await worker.aclose()
    finally:
        await admin.aclose()
        server.terminate()
        await server.wait()


def test_names_that_cannot_be_rules_are_refused_and_globs_escaped() -> None:
    from agentmesh.access.plan import AgentAccess, plan_for
    from agentmesh.agents import Agent
    from agentmesh.schemas.registry import Registry

    spaced = AgentAccess(name="my agent", reads=("in",), writes=())
    with pytest.raises(ValueError, match="cannot go into a Redis ACL rule"):
        redis_acl.agent_user(spaced, "mesh:dlq")
    globby = AgentAccess(name="a", reads=("in*",), writes=("out[1]",))
    rules = " ".join(redis_acl.agent_user(globby, "mesh:dlq").rules)
    assert "~in\\*" in rules and "~out\\[1\\]" in rules and "~in*" not in rules
    reg = Registry()
    a, b = Agent("a-b", registry=reg), Agent("a_b", registry=reg)
    try:
        with pytest.raises(ValueError, match="would share the PostgreSQL role mesh_agent_a_b"):
            plan_for([a, b], dlq_stream="mesh:dlq", reg=reg)
    finally:
        from agentmesh.agents.agent import AGENTS

        for name in ("a-b", "a_b"):  # defined for this test only
            AGENTS.pop(name, None)


async def test_a_budgeted_dependency_gets_its_bucket_and_no_other(stack, redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """budget.lua under the agent's user: its dependency's shared bucket, not another's."""
    from agentmesh import Agent, Budget, DependencySpec
    from agentmesh.access.plan import plan_for
    from agentmesh.agents.agent import AGENTS
    from agentmesh.bus.budget import Buckets
    from agentmesh.schemas.registry import Registry

    reg = Registry()
    agent = Agent("budgeted", registry=reg,
                  dependencies=[DependencySpec(name="gw", budget=Budget(rate=5))])  # fmt: skip
    try:
        (access,) = plan_for([agent], dlq_stream="mesh:dlq", reg=reg).agents
    finally:
        AGENTS.pop("budgeted", None)
    assert access.budgets == ("gw",)
    sec = Secrets(tmp_path / "s")
    user = redis_acl.agent_user(access, "mesh:dlq")
    await redis_acl.apply(redis, [user], sec)
    client = Redis.from_url(redis_url_as(stack, user.name, sec))
    try:
        buckets = Buckets(client)
        took = await buckets.take("gw", rate_per_s=5, burst=5, amount=1, max_wait_s=0)
        assert took.granted
        with pytest.raises(NoPermissionError):
            await buckets.take("llm", rate_per_s=5, burst=5, amount=1, max_wait_s=0)
    finally:
        await client.aclose()
