"""`mesh dev up|down|status` and `mesh db migrate`: the local stack and the schema."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer
from rich.table import Table

from agentmesh import devstack
from agentmesh.cli.common import (
    EXIT_FAILED,
    EXIT_INPUT,
    JsonOpt,
    emit_json,
    fail,
    out,
    run,
    safe,
    settings,
    spinner,
)
from agentmesh.outbox.migrate import migrate
from agentmesh.settings import Settings

dev_app = typer.Typer(
    help="The local stack: Redis, PostgreSQL and a Kafka-compatible broker.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)

ServicesArg = Annotated[
    list[str] | None, typer.Argument(help="Services (redis, postgres, kafka); default all.")
]


def stack_config(s: Settings) -> devstack.StackConfig:
    """The local stack the settings point at (ports and database from the URLs)."""
    redis = urlparse(s.redis_url)
    pg = urlparse(s.postgres_dsn)
    return devstack.StackConfig(
        root=Path(s.dev_root).resolve(),
        redis_port=redis.port or 6379,
        pg_port=pg.port or 5432,
        kafka_port=int(s.kafka_bootstrap.rsplit(":", 1)[1]),
        s3_port=s.dev_s3_port,
        pg_user=pg.username or "mesh",
        pg_db=(pg.path or "/mesh").lstrip("/") or "mesh",
    )


def _services(names: list[str] | None) -> tuple[str, ...]:
    chosen = tuple(names or devstack.SERVICES)
    unknown = [n for n in chosen if n not in devstack.SERVICES]
    if unknown:
        fail(f"unknown service {unknown[0]!r}; choose from {', '.join(devstack.SERVICES)}",
             EXIT_INPUT)  # fmt: skip
    return chosen


def _print_status(rows: list[devstack.ServiceStatus], as_json: bool) -> None:
    if as_json:
        emit_json([asdict(r) for r in rows])
        return
    table = Table("service", "state", "pid", "address", "detail")
    for r in rows:
        state = "[green]running[/]" if r.running else "[red]stopped[/]"
        table.add_row(safe(r.name), state, str(r.pid or "-"), safe(r.address), safe(r.detail))
    for p in devstack.background.listed(stack_config(settings())):
        table.add_row(safe(p.name), "[green]running[/]", str(p.pid), "-", "mesh process")
    out.print(table)


@dev_app.command("up")
def dev_up(services: ServicesArg = None, as_json: JsonOpt = False) -> None:
    """Start the local stack (idempotent) and apply database migrations."""
    s = settings()
    chosen = _services(services)
    with spinner("starting the local stack…", enabled=not as_json):
        rows = devstack.up(stack_config(s), chosen)
        if "postgres" in chosen:
            run(migrate(s))
    _print_status(rows, as_json)


@dev_app.command("down")
def dev_down(services: ServicesArg = None) -> None:
    """Stop the local stack; no process is left behind. Data stays in the data dir."""
    cfg = stack_config(settings())
    if not services:  # the agents, relay and gateway stand-in `mesh demo --keep` left running
        n = devstack.background.stop(cfg)
        if n:
            out.print(f"stopped {n} mesh process(es) (agents, relay, gateway stand-in)")
    devstack.down(cfg, _services(services))
    out.print("local stack stopped")


@dev_app.command("status")
def dev_status(services: ServicesArg = None, as_json: JsonOpt = False) -> None:
    """Show which local servers run. Exit code 1 when any is stopped."""
    rows = devstack.status(stack_config(settings()), _services(services))
    _print_status(rows, as_json)
    if not all(r.running for r in rows):
        raise typer.Exit(EXIT_FAILED)


@db_app.command("migrate")
def db_migrate(as_json: JsonOpt = False) -> None:
    """Apply pending schema migrations (safe to run from several replicas at once)."""
    applied = run(migrate(settings()))
    if as_json:
        emit_json([{"version": m.version, "name": m.name} for m in applied])
    elif applied:
        for m in applied:
            out.print(f"applied {m.version:04d}_{m.name}")
    else:
        out.print("schema is up to date")
