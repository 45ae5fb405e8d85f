"""`mesh access plan|redis-acl|pg-roles`: least-privilege credentials from the agents' own
declarations (agentmesh/access). Passwords are read from the environment or the secrets
directory, or generated into it (mode 0600); what is printed carries only hashes."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agentmesh import connect
from agentmesh.access import pg_roles, redis_acl
from agentmesh.access.plan import AccessPlan, plan_for
from agentmesh.access.secrets import Secrets
from agentmesh.cli.common import (
    EXIT_INPUT,
    JsonOpt,
    ModuleOpt,
    emit_json,
    fail,
    load_agents,
    out,
    run,
    safe,
    settings,
)

access_app = typer.Typer(
    help="Least-privilege Redis ACL users and PostgreSQL roles, from the agents' declarations.",
    no_args_is_help=True,
)

SecretsOpt = Annotated[
    Path | None,
    typer.Option(
        "--secrets-dir",
        help="Where passwords are read from or generated into (default: <MESH_DEV_ROOT>/secrets).",
    ),
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Write to this file (mode 0600) instead of stdout.")
]
ApplyOpt = Annotated[
    bool, typer.Option("--apply", help="Apply to the server (MESH_REDIS_URL, MESH_POSTGRES_DSN).")
]


def current_plan(module: str | None) -> AccessPlan:
    agents = load_agents(module)
    if not agents:
        fail("the agents module defines no agents", EXIT_INPUT)
    try:
        return plan_for(agents.values(), dlq_stream=settings().dlq_stream)
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)


def secrets_at(path: Path | None) -> Secrets:
    return Secrets(path or Path(settings().dev_root) / "secrets")


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    out.print(f"wrote {safe(path)}")


@access_app.command("plan")
def plan_cmd(module: ModuleOpt = None, as_json: JsonOpt = False) -> None:
    """What each agent's credentials may read and write, from its declarations."""
    p = current_plan(module)
    if as_json:
        emit_json(asdict(p))
        return
    table = Table("agent", "reads", "writes", "redis user", "postgres role")
    for a in p.agents:
        table.add_row(safe(a.name), safe(", ".join(a.reads)), safe(", ".join(a.writes) or "-"),
                      safe(a.redis_user), safe(a.pg_role))  # fmt: skip
    out.print(table)
    out.print(f"DLQ {safe(p.dlq_stream)}; decisions on {safe(', '.join(p.decision_streams) or '-')}"
              f"; work comes in on {safe(', '.join(p.entry_streams) or '-')}")  # fmt: skip


@access_app.command("redis-acl")
def redis_acl_cmd(
    module: ModuleOpt = None,
    aclfile: Annotated[
        bool, typer.Option("--aclfile", help="aclfile lines instead of ACL SETUSER commands.")
    ] = False,
    secrets_dir: SecretsOpt = None,
    out_file: OutOpt = None,
    apply: ApplyOpt = False,
) -> None:
    """Redis ACL users: one per agent type, plus mesh-read, mesh-approve, mesh-dlq and
    mesh-publisher for operators. The default user is left as it is."""
    try:
        users = redis_acl.users_for(current_plan(module))
    except ValueError as exc:  # a name no ACL rule can hold
        fail(str(exc), EXIT_INPUT)
    sec = secrets_at(secrets_dir)
    if apply:
        names = run(_apply_redis(users, sec))
        out.print(f"applied {len(names)} Redis ACL users: {safe(', '.join(names))}")
        out.print(f"passwords in {safe(sec.root / 'redis')}")
        return
    lines = (redis_acl.aclfile_lines if aclfile else redis_acl.setuser_lines)(users, sec)
    text = "\n".join(lines) + "\n"
    if out_file is not None:
        _write(out_file, text)
    else:
        out.print(text, end="", highlight=False, markup=False, soft_wrap=True)


async def _apply_pg(p: AccessPlan, ops: list[pg_roles.Login], sec: Secrets) -> list[str]:
    conn = await connect.pg_connect(settings())
    try:
        return await pg_roles.apply(conn, p, ops, sec)
    finally:
        await conn.close()


async def _apply_redis(users: list[redis_acl.AclUser], sec: Secrets) -> list[str]:
    client = connect.redis_client(settings())
    try:
        return await redis_acl.apply(client, users, sec)
    finally:
        await client.aclose()


@access_app.command("pg-roles")
def pg_roles_cmd(
    module: ModuleOpt = None,
    operator: Annotated[
        list[str] | None,
        typer.Option(
            "--operator",
            help="An operator's login role and rights, e.g. alice=approve,dlq or bob=read "
            "(repeat for each).",
        ),
    ] = None,
    secrets_dir: SecretsOpt = None,
    out_file: OutOpt = None,
    apply: ApplyOpt = False,
) -> None:
    """PostgreSQL roles: the groups mesh_agent, mesh_relay, mesh_read, mesh_approve, mesh_dlq,
    a login role per agent type, mesh_relay_user, and one per --operator. Printed SQL has no
    passwords; --out and --apply set SCRAM verifiers of the passwords in the secrets dir."""
    p = current_plan(module)
    try:
        ops = [pg_roles.parse_operator(o) for o in operator or []]
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)
    sec = secrets_at(secrets_dir)
    if apply:
        names = run(_apply_pg(p, ops, sec))
        out.print(f"applied {len(pg_roles.GROUPS)} group roles and {len(names)} login roles: "
                  f"{safe(', '.join(names))}")  # fmt: skip
        out.print(f"passwords in {safe(sec.root / 'postgres')}")
        return
    if out_file is not None:
        _write(out_file, pg_roles.script(p, ops, sec))
    else:
        out.print(pg_roles.script(p, ops, None), end="", highlight=False, markup=False,
                  soft_wrap=True)  # fmt: skip
