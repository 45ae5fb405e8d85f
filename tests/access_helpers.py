"""Roles and ACL users for the access tests, applied to the session's stack (idempotent)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import tests.mesh_fixture  # noqa: F401  (registers the agents the plan is made from)
from agentmesh import devstack
from agentmesh.access import pg_roles
from agentmesh.access.plan import AccessPlan, plan_for
from agentmesh.access.secrets import Secrets
from agentmesh.agents.agent import AGENTS
from agentmesh.schemas import registry
from agentmesh.schemas.approval import Decision

OPERATORS = ("alice=approve", "carol=dlq", "bob=read")


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


class TestDecided(Decision):
    """The decision type of the identity tests' waiting step."""


DECISION_TYPE = "t.decided"
if DECISION_TYPE not in registry:
    registry.register(DECISION_TYPE, TestDecided, stream="t:decisions")
