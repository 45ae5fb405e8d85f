"""The local stack's least-privilege credentials, made by `mesh dev up`: a Redis ACL user and a
PostgreSQL login role per agent type (of MESH_AGENTS_MODULE, when set), the operator users
and the group roles, with passwords under `<root>/secrets`. The default Redis user and the
owner role stay as they are, so the demo and the tests work unchanged; run an agent with its
own credentials to see what it may not do (docs/access-control.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agentmesh import connect
from agentmesh.access import pg_roles, redis_acl
from agentmesh.access.plan import plan_for
from agentmesh.access.secrets import Secrets
from agentmesh.agents.agent import Agent
from agentmesh.settings import Settings


@dataclass(frozen=True)
class AccessApplied:
    redis_users: list[str]
    pg_logins: list[str]
    secrets_dir: Path


def secrets_dir(root: Path) -> Path:
    return root / "secrets"


def apply(root: Path, s: Settings, *, agents: Iterable[Agent]) -> AccessApplied:
    """Create or update the users and roles (idempotent; passwords kept across runs), on the
    servers `s` names, with its (admin) credentials."""
    plan = plan_for(agents, dlq_stream=s.dlq_stream)
    sec = Secrets(secrets_dir(root))

    async def go() -> AccessApplied:
        client = connect.redis_client(s)
        try:
            users = await redis_acl.apply(client, redis_acl.users_for(plan), sec)
        finally:
            await client.aclose()
        conn = await connect.pg_connect(s)
        try:
            logins = await pg_roles.apply(conn, plan, [], sec)
        finally:
            await conn.close()
        return AccessApplied(users, logins, sec.root)

    return asyncio.run(go())
