"""Roles and ACL users for the access tests, applied to the session's stack (idempotent)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

import tests.mesh_fixture  # noqa: F401  (registers the agents the plan is made from)
from agentmesh import devstack
from agentmesh.access import pg_roles
from agentmesh.access.plan import AccessPlan, plan_for
from agentmesh.access.secrets import Secrets
from agentmesh.agents.agent import AGENTS

OPERATORS = ("ava=approve", "dan=dlq", "rita=read")  # names no other test uses


def plan() -> AccessPlan:
    fixture_agents = [a for n, a in AGENTS.items() if n in ("worker", "finisher", "caller")]
    return plan_for(fixture_agents, dlq_stream="mesh:dlq")


async def apply_roles(stack: devstack.StackConfig, secrets_dir: Path) -> Secrets:
    sec = Secrets(secrets_dir)
    ops = [pg_roles.parse_operator(o) for o in OPERATORS]
    await pg_roles.apply(stack.postgres_dsn, plan(), ops, sec)
    return sec


def dsn_as(stack: devstack.StackConfig, role: str, sec: Secrets) -> str:
    pw = quote(sec.password("postgres", role), safe="")
    return f"postgresql://{role}:{pw}@{stack.host}:{stack.pg_port}/{stack.pg_db}"


def redis_url_as(stack: devstack.StackConfig, user: str, sec: Secrets) -> str:
    pw = quote(sec.password("redis", user), safe="")
    return f"redis://{user}:{pw}@{stack.host}:{stack.redis_port}/0"


def dsn_with_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def operator_env(env: dict[str, str], name: str) -> dict[str, str]:
    """`env` for an operator who logs in to PostgreSQL as the role `name`, a member of the
    tables' owner (so with every right, as a single-credential deployment): the identity
    recorded with its actions. (The local stack trusts loopback, so no password.)"""
    dsn = env["MESH_POSTGRES_DSN"]
    conn = await asyncpg.connect(dsn)
    try:
        owner = await conn.fetchval("SELECT session_user")
        await conn.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') "
            f'THEN CREATE ROLE "{name}" LOGIN; END IF; END $$; GRANT "{owner}" TO "{name}"'
        )
    finally:
        await conn.close()
    return {**env, "MESH_POSTGRES_DSN": dsn_with_user(dsn, name)}
