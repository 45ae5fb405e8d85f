"""PostgreSQL roles for agents, relays and operators, with the grants each needs and no more.

Group roles (NOLOGIN) carry the grants; login roles are members of them:

| group          | may                                                                    |
|----------------|------------------------------------------------------------------------|
| mesh_agent     | the unit of work: read and insert idempotency keys, actions, outbox rows |
| mesh_relay     | read the outbox, mark rows published, prune them, keep the audit index |
| mesh_read      | read every mesh table (sessions, status, replay)                       |
| mesh_approve   | mesh_read + write the audit row of an approve/reject, publish decisions |
| mesh_dlq       | mesh_read + DLQ and republish/redrive audit rows, re-mark rows (+ relay) |
| mesh_projector | mesh_read + the projection tables and snapshots; CREATE in the schema    |

Row security (migration 0007) limits each agent role further to its own agent's rows, and
its outbox rows to the streams it emits (`mesh_agent_roles`, written here).

Operator actions are also checked by the database itself: migration 0007 refuses a
`mesh.operator` row whose role is not in the group the action needs, and records the role
as the operator. An agent's role is in none of them, so it cannot write an operator action.

Login roles: `mesh_agent_<name>` per agent type, `mesh_relay_user`, `mesh_projector_user`, and
one per operator, named as given (`alice=approve,dlq`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from agentmesh.access.plan import AccessPlan
from agentmesh.access.secrets import Secrets, scram_verifier

GROUPS = ("mesh_agent", "mesh_relay", "mesh_read", "mesh_approve", "mesh_dlq", "mesh_projector")
OPERATOR_RIGHTS = {
    "read": "mesh_read",
    "approve": "mesh_approve",
    "dlq": "mesh_dlq",
    "projections": "mesh_projector",
}
RELAY_LOGIN = "mesh_relay_user"
PROJECTOR_LOGIN = "mesh_projector_user"
_PROJECTOR_DML = "SELECT, INSERT, UPDATE, DELETE"

#: Every table the migrations create, and what each group may do with it. A new table must be
#: added here (tests/test_access_pg.py fails on a table nobody classified).
TABLES: dict[str, dict[str, str]] = {
    "mesh_idempotency": {"mesh_agent": "SELECT, INSERT"},
    "mesh_actions": {"mesh_agent": "SELECT, INSERT"},
    "mesh_outbox": {
        "mesh_agent": "SELECT, INSERT",
        "mesh_relay": "SELECT, INSERT, DELETE, "
        "UPDATE (published_at, kafka_topic, kafka_partition, kafka_offset)",
        "mesh_approve": "INSERT",
        "mesh_dlq": "INSERT, UPDATE (published_at)",
    },
    "mesh_audit_index": {"mesh_relay": "SELECT, INSERT, UPDATE, DELETE"},
    "mesh_relay_config": {"mesh_relay": "SELECT, INSERT, UPDATE, DELETE"},
    "mesh_relay_leases": {"mesh_relay": "SELECT, INSERT, UPDATE, DELETE"},
    "mesh_relay_members": {"mesh_relay": "SELECT, INSERT, UPDATE, DELETE"},
    "mesh_schema_migrations": {},
    "mesh_agent_roles": {},  # which agent a role is: read by the row-security policies only
    # read models folded from the audit log (`mesh projection run|rebuild`)
    "mesh_projections": {"mesh_projector": _PROJECTOR_DML},
    "mesh_projection_offsets": {"mesh_projector": _PROJECTOR_DML},
    "mesh_projection_applied": {"mesh_projector": _PROJECTOR_DML},
    "mesh_projection_skipped": {"mesh_projector": _PROJECTOR_DML},
    "mesh_session_snapshots": {"mesh_projector": _PROJECTOR_DML},
}
SEQUENCES: dict[str, tuple[str, ...]] = {
    "mesh_actions_id_seq": ("mesh_agent",),
    "mesh_outbox_id_seq": ("mesh_agent", "mesh_relay", "mesh_approve", "mesh_dlq"),
}
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, kw_only=True)
class Login:
    name: str
    groups: tuple[str, ...]
    purpose: str


def parse_operator(spec: str) -> Login:
    """`alice=approve,dlq` → the login role alice in mesh_approve and mesh_dlq."""
    name, _, rights = spec.partition("=")
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"operator role name {name!r}: use lower-case letters, digits and _")
    wanted = [r.strip() for r in (rights or "read").split(",") if r.strip()]
    bad = [r for r in wanted if r not in OPERATOR_RIGHTS]
    if bad:
        raise ValueError(
            f"unknown right {bad[0]!r} for {name}: choose from {', '.join(OPERATOR_RIGHTS)}"
        )
    groups = tuple(OPERATOR_RIGHTS[r] for r in wanted)
    return Login(name=name, groups=groups, purpose=f"operator: {', '.join(wanted)}")


def logins(plan: AccessPlan, operators: Sequence[Login] = ()) -> list[Login]:
    out = [
        Login(name=a.pg_role, groups=("mesh_agent",), purpose=f"agent {a.name}")
        for a in plan.agents
    ]
    out.append(Login(name=RELAY_LOGIN, groups=("mesh_relay",), purpose="outbox relay"))
    out.append(
        Login(name=PROJECTOR_LOGIN, groups=("mesh_projector",), purpose="projection runners")
    )
    return out + list(operators)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _create_role(name: str, options: str) -> str:
    """CREATE ROLE if missing (PostgreSQL has no CREATE ROLE IF NOT EXISTS), then its options."""
    lit = name.replace("'", "''")
    return (
        f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{lit}') THEN "
        f"CREATE ROLE {_ident(name)}; END IF; END $$;\n"
        f"ALTER ROLE {_ident(name)} {options};"
    )


def group_sql() -> list[str]:
    """The group roles and their grants (no secrets: safe to print)."""
    out = [_create_role(g, "NOLOGIN") for g in GROUPS]
    out += ["GRANT mesh_read TO mesh_approve;", "GRANT mesh_read TO mesh_dlq;"]
    out.append("GRANT mesh_relay TO mesh_dlq;  -- republish runs a relay in the operator's process")
    out.append("GRANT mesh_read TO mesh_projector;")
    out.append(  # a projection's live table and view are created by its runner
        "DO $$ BEGIN EXECUTE format('GRANT CREATE ON SCHEMA %I TO mesh_projector', "
        "current_schema()); END $$;"
    )
    for table, grants in TABLES.items():
        out.append(f"REVOKE ALL ON {table} FROM PUBLIC, {', '.join(GROUPS)};")
        out.append(f"GRANT SELECT ON {table} TO mesh_read;")
        for group, privileges in grants.items():
            out.append(f"GRANT {privileges} ON {table} TO {group};")
    for seq, groups in SEQUENCES.items():
        out.append(f"GRANT USAGE ON SEQUENCE {seq} TO {', '.join(groups)};")
    return out


def login_sql(users: Iterable[Login], secrets: Secrets | None) -> list[str]:
    """Login roles in their groups. With `secrets`, each gets a SCRAM verifier of its password
    (never the password itself); without, no password is set (print-only output)."""
    out: list[str] = []
    for u in users:
        options = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT"
        if secrets is not None:
            verifier = scram_verifier(secrets.password("postgres", u.name))
            options += f" PASSWORD '{verifier}'"
        out.append(f"-- {u.purpose}")
        out.append(_create_role(u.name, options))
        for g in u.groups:
            out.append(f"GRANT {g} TO {_ident(u.name)};")
    return out


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def agent_rows_sql(plan: AccessPlan) -> list[str]:
    """Which agent each agent role is, and the streams it emits: what the row-security
    policies of migration 0007 limit the role to."""
    out = []
    for a in plan.agents:
        streams = "ARRAY[" + ", ".join(_literal(s) for s in a.writes) + "]::text[]"
        out.append(
            "INSERT INTO mesh_agent_roles (role, agent, streams) VALUES "
            f"({_literal(a.pg_role)}, {_literal(a.name)}, {streams}) ON CONFLICT (role) "
            "DO UPDATE SET agent = EXCLUDED.agent, streams = EXCLUDED.streams;"
        )
    return out


def script(plan: AccessPlan, operators: Sequence[Login], secrets: Secrets | None) -> str:
    lines = [
        "-- agentmesh roles (mesh access pg-roles); run as the tables' owner (or a superuser)",
        "-- that may create roles, after `mesh db migrate`",
        "BEGIN;",
        *group_sql(),
        *login_sql(logins(plan, operators), secrets),
        *agent_rows_sql(plan),
        # the tables a projection runner creates can be read by every reader
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {PROJECTOR_LOGIN} GRANT SELECT ON TABLES TO mesh_read;",
        "COMMIT;",
    ]
    return "\n".join(lines) + "\n"


async def apply(
    target: str | asyncpg.Connection,
    plan: AccessPlan,
    operators: Sequence[Login],
    secrets: Secrets,
) -> list[str]:
    """Create or update the roles and grants in one transaction, on a connection (or a DSN)
    of the tables' owner; the login roles' names."""
    conn = await asyncpg.connect(target) if isinstance(target, str) else target
    try:
        await conn.execute(script(plan, operators, secrets))
    finally:
        if isinstance(target, str):
            await conn.close()
    return [u.name for u in logins(plan, operators)]
