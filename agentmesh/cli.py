"""The `mesh` command. Readable tables by default, `--json` for scripts, one-line errors.

Exit codes: 0 ok, 1 the operation failed, 2 bad input (usage, invalid payload),
3 a server (Redis, PostgreSQL, Kafka) is unreachable.
"""

from __future__ import annotations

import asyncio
import getpass
import importlib
import json
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast
from urllib.parse import urlparse

import typer
from rich.console import Console
from rich.table import Table

from agentmesh.settings import Settings, load_settings

T = TypeVar("T")

app = typer.Typer(
    name="mesh",
    help="agentmesh: AI agents as a choreographed mesh over Redis Streams, Postgres and Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
dev_app = typer.Typer(
    help="The local stack: Redis, PostgreSQL and a Kafka-compatible broker.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
agent_app = typer.Typer(help="Run and list agents.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(db_app, name="db")
app.add_typer(agent_app, name="agent")


def _register_audit_commands() -> None:
    from agentmesh.audit_cli import outbox_app, relay_app, replay

    app.add_typer(relay_app, name="relay")
    app.add_typer(outbox_app, name="outbox")
    app.command("replay")(replay)

    from agentmesh.session_cli import approve_cmd, reject_cmd, session_cmd, sessions_cmd
    from agentmesh.status_cli import status

    app.command("sessions")(sessions_cmd)
    app.command("session")(session_cmd)
    app.command("approve")(approve_cmd)
    app.command("reject")(reject_cmd)

    app.command("status")(status)

    import agentmesh.dlq_actions  # noqa: F401  (adds retry, drop, edit to `mesh dlq`)
    from agentmesh.dlq_cli import dlq_app

    app.add_typer(dlq_app, name="dlq")


_register_audit_commands()

out = Console(width=None if sys.stdout.isatty() else 160)  # piped output: do not wrap at 80
err = Console(stderr=True, soft_wrap=True)

EXIT_FAILED, EXIT_INPUT, EXIT_UNAVAILABLE = 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    raise CliError(message, code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def settings() -> Settings:
    return load_settings()


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# -- local stack ----------------------------------------------------------------------------
def stack_config(s: Settings) -> Any:
    from agentmesh.devstack import StackConfig

    redis = urlparse(s.redis_url)
    pg = urlparse(s.postgres_dsn)
    kafka_port = int(s.kafka_bootstrap.rsplit(":", 1)[1])
    return StackConfig(
        root=Path(s.dev_root).resolve(),
        redis_port=redis.port or 6379,
        pg_port=pg.port or 5432,
        kafka_port=kafka_port,
        s3_port=s.dev_s3_port,
        pg_user=pg.username or "mesh",
        pg_db=(pg.path or "/mesh").lstrip("/") or "mesh",
    )


def _services(names: list[str] | None) -> tuple[str, ...]:
    from agentmesh.devstack import SERVICES

    chosen = tuple(names or SERVICES)
    unknown = [n for n in chosen if n not in SERVICES]
    if unknown:
        fail(f"unknown service {unknown[0]!r}; choose from {', '.join(SERVICES)}", EXIT_INPUT)
    return chosen


def _print_status(rows: list[Any], as_json: bool) -> None:
    if as_json:
        emit_json([r.__dict__ for r in rows])
        return
    from agentmesh import localprocs

    table = Table("service", "state", "pid", "address", "detail")
    for r in rows:
        state = "[green]running[/]" if r.running else "[red]stopped[/]"
        table.add_row(r.name, state, str(r.pid or "-"), r.address, r.detail)
    for p in localprocs.listed(stack_config(settings())):
        table.add_row(p.name, "[green]running[/]", str(p.pid), "-", "mesh process")
    out.print(table)


ServicesArg = Annotated[
    list[str] | None, typer.Argument(help="Services (redis, postgres, kafka); default all.")
]


@dev_app.command("up")
def dev_up(services: ServicesArg = None, as_json: JsonOpt = False) -> None:
    """Start the local stack (idempotent) and apply database migrations."""
    from agentmesh import devstack

    s = settings()
    chosen = _services(services)
    with out.status("starting the local stack…") if not as_json else _null():
        rows = devstack.up(stack_config(s), chosen)
        if "postgres" in chosen:
            from agentmesh.outbox.migrate import migrate

            run(migrate(s.postgres_dsn))
    _print_status(rows, as_json)


@dev_app.command("down")
def dev_down(services: ServicesArg = None) -> None:
    """Stop the local stack; no process is left behind. Data stays in the data dir."""
    from agentmesh import devstack, localprocs

    cfg = stack_config(settings())
    if not services:  # the agents, relay and gateway stand-in `mesh demo --keep` left running
        n = localprocs.stop(cfg)
        if n:
            out.print(f"stopped {n} mesh process(es) (agents, relay, gateway stand-in)")
    devstack.down(cfg, _services(services))
    out.print("local stack stopped")


@dev_app.command("status")
def dev_status(services: ServicesArg = None, as_json: JsonOpt = False) -> None:
    """Show which local servers run. Exit code 1 when any is stopped."""
    from agentmesh import devstack

    rows = devstack.status(stack_config(settings()), _services(services))
    _print_status(rows, as_json)
    if not all(r.running for r in rows):
        raise typer.Exit(EXIT_FAILED)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


# -- database -------------------------------------------------------------------------------
@db_app.command("migrate")
def db_migrate(as_json: JsonOpt = False) -> None:
    """Apply pending schema migrations (safe to run from several replicas at once)."""
    from agentmesh.outbox.migrate import migrate

    applied = run(migrate(settings().postgres_dsn))
    if as_json:
        emit_json([{"version": m.version, "name": m.name} for m in applied])
    elif applied:
        for m in applied:
            out.print(f"applied {m.version:04d}_{m.name}")
    else:
        out.print("schema is up to date")


# -- agents ---------------------------------------------------------------------------------
def load_agents(module: str | None) -> dict[str, Any]:
    from agentmesh.agents.agent import AGENTS

    name = module or settings().agents_module
    if not name:
        fail("MESH_AGENTS_MODULE is not set: name the module that defines your agents "
             "(or pass --module)", EXIT_INPUT)  # fmt: skip
    try:
        importlib.import_module(name)
    except ImportError as exc:
        fail(f"cannot import agents module {name!r}: {exc}", EXIT_INPUT)
    return AGENTS


ModuleOpt = Annotated[
    str | None,
    typer.Option("--module", "-m", help="Module defining the agents (MESH_AGENTS_MODULE)."),
]


@agent_app.command("run")
def agent_run(
    name: str,
    module: ModuleOpt = None,
    http_port: Annotated[
        int | None, typer.Option(help="Port of /healthz /readyz /metrics.")
    ] = None,
    consumers: Annotated[int | None, typer.Option(help="Consumer loops in this process.")] = None,
) -> None:
    """Run one agent type as this process, until SIGTERM/SIGINT."""
    from agentmesh.agents.runner import Runner
    from agentmesh.logs import configure

    agents = load_agents(module)
    if name not in agents:
        fail(f"no agent named {name!r}; known: {', '.join(sorted(agents)) or 'none'}", EXIT_INPUT)
    overrides: dict[str, Any] = {}
    if http_port is not None:
        overrides["http_port"] = http_port
    if consumers is not None:
        overrides["consumers"] = consumers
    s = load_settings(**overrides)
    configure(fmt=s.log_format, level=s.log_level)
    run(Runner(agents[name], s).run_forever())


@agent_app.command("list")
def agent_list(module: ModuleOpt = None, as_json: JsonOpt = False) -> None:
    """List the agents a module defines: what each consumes and emits."""
    agents = load_agents(module)
    rows = [a.describe() for a in agents.values()]
    if as_json:
        emit_json(rows)
        return
    table = Table("agent", "consumes (type → stream)", "emits", "dependencies")
    for r in rows:
        consumes = "\n".join(f"{t} → {s}" for t, s in r["consumes"].items())
        table.add_row(r["name"], consumes, ", ".join(r["emits"]), ", ".join(r["dependencies"]))
    out.print(table)


# -- publishing -----------------------------------------------------------------------------
def read_payload(raw: str) -> Any:
    """A payload from the argument itself, `@file`, or `-` (stdin)."""
    if raw == "-":
        raw = sys.stdin.read()
    elif raw.startswith("@"):
        path = Path(raw[1:])
        if not path.is_file():
            fail(f"payload file {path} not found", EXIT_INPUT)
        raw = path.read_text()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"payload is not valid JSON: {exc}", EXIT_INPUT)


@app.command("publish")
def publish(
    stream: Annotated[str, typer.Argument(help="Target stream (must be the type's stream).")],
    event_type: Annotated[str, typer.Option("--type", "-t", help="Event type.")],
    session: Annotated[
        str | None, typer.Option("--session", "-s", help="Session id (new if omitted).")
    ] = None,
    payload: Annotated[
        str, typer.Option("--payload", "-p", help="JSON, @file or - for stdin.")
    ] = "{}",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Dedup key (default: the event id).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the session until it ends or waits on a human.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 120.0,
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a payload against its event schema, then XADD it onto STREAM."""
    from agentmesh.schemas import PoisonMessage, registry
    from agentmesh.schemas.ids import new_event_id

    load_agents(module)
    data = read_payload(payload)
    if not isinstance(data, dict):
        fail("payload must be a JSON object", EXIT_INPUT)
    try:
        expected = registry.stream_of(event_type)
        fields: dict[str, Any] = {
            "session_id": session or f"s-{new_event_id()}",
            "source": f"cli:{getpass.getuser()}",  # who put it into the mesh, for the audit log
        }
        if idempotency_key:
            fields["idempotency_key"] = idempotency_key
        env = registry.make(event_type, data, **fields)
    except PoisonMessage as exc:
        fail(f"invalid {event_type} payload: {exc}", EXIT_INPUT)
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)
    if expected != stream:
        fail(f"{event_type} travels on stream {expected!r}, not {stream!r}", EXIT_INPUT)
    entry_id = run(_publish(settings(), stream, env))
    result: dict[str, Any] = {
        "event_id": env.event_id,
        "session_id": env.session_id,
        "stream": stream,
        "entry_id": entry_id,
    }
    if not as_json:
        out.print(f"published {event_type} {env.event_id} to {stream} (session {env.session_id})")
    if wait:
        with err.status(f"following session {env.session_id}", spinner="dots") as status:
            row = run(_follow(settings(), env.session_id, timeout, status if not as_json else None))
        result["session"] = row
        if not as_json:
            step = row["step"] if row else "no agent acted"
            out.print(f"session {env.session_id}: {row['status'] if row else 'timed out'} · {step}")
    if as_json:
        emit_json(result)
    if wait and (not result.get("session") or result["session"]["status"] == "running"):
        fail(f"session {env.session_id} did not end within {timeout:.0f} s", EXIT_FAILED)


async def _follow(s: Settings, session: str, within_s: float, status: Any) -> Any:
    """Poll the session's status until it ends or waits on a human; the last row seen."""
    import asyncpg

    from agentmesh.outbox.sessions import sessions

    conn = await asyncpg.connect(s.postgres_dsn)
    row: Any = None
    try:
        deadline = asyncio.get_running_loop().time() + within_s
        while asyncio.get_running_loop().time() < deadline:
            rows = await sessions(conn, session_id=session, limit=1)
            row = rows[0] if rows else None
            if row and status is not None:
                status.update(f"session {session}: {row['status']} · {row['step']}")
            if row and row["status"] in ("ended", "waiting"):
                return row
            await asyncio.sleep(0.3)
        return row
    finally:
        await conn.close()


async def _publish(s: Settings, stream: str, env: Any) -> str | None:
    """Outbox row first (so the audit log and `mesh outbox redrive` know the event), then
    the deduplicating XADD."""
    import asyncpg
    from redis.asyncio import Redis

    from agentmesh.bus import Streams
    from agentmesh.outbox.publish import publish_events

    redis = Redis.from_url(s.redis_url)
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        bus = Streams(redis, group="-", consumer="-", dedup_ttl_s=s.dedup_ttl_s)
        (entry_id,) = await publish_events(conn, bus, [(stream, env)])
        return entry_id
    finally:
        await conn.close()
        await redis.aclose()


@app.command("demo")
def demo(
    tickets: Annotated[
        int, typer.Option(min=10, max=5000, help="Refund tickets to publish.")
    ] = 300,
    mesh_name: Annotated[
        str, typer.Option("--mesh", help="refund (the refund desk) or planner (two agents).")
    ] = "refund",
    tasks: Annotated[int, typer.Option(min=1, max=1000, help="Tasks (--mesh planner).")] = 3,
    keep: Annotated[
        bool, typer.Option(help="Leave the desk (agents, relay, gateway, stack) running.")
    ] = False,
    publish_seconds: Annotated[
        float, typer.Option(min=0.5, max=600, help="Tickets flow in over this many seconds.")
    ] = 8.0,
    outage_seconds: Annotated[
        float, typer.Option(min=0, max=600, help="Gateway outage, 2 s after the first ticket.")
    ] = 4.0,
) -> None:
    """The refund desk end to end: stack up, every agent a process, tickets, summary, stop."""
    s = settings()
    _examples_on_path()
    if mesh_name == "planner":
        from planner_writer.demo import run_demo

        result = run_demo(s, stack_config(s), tasks=tasks, keep=keep, console=out)
        out.print(f"done in {result.elapsed_s:.1f} s")
        if result.completed < tasks:
            raise typer.Exit(EXIT_FAILED)
        return
    if mesh_name != "refund":
        fail(f"unknown mesh {mesh_name!r}; choose refund or planner", EXIT_INPUT)
    from refund_desk.demo import DemoPlan, run_refund_demo

    plan = DemoPlan(tickets=tickets, publish_s=publish_seconds, outage_s=outage_seconds,
                    outage_at_s=min(2.0, publish_seconds / 3))  # fmt: skip
    r = run_refund_demo(s, stack_config(s), plan=plan, keep=keep, console=out)
    out.print(f"done in {r.elapsed_s:.1f} s")
    if not r.ok:
        fail("not every ticket settled (see the summary above)", EXIT_FAILED)


def _examples_on_path() -> None:
    """The demos live in the source checkout's examples/ folder, not in the installed package;
    put it on the path of this process and of every process the demo starts."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    if not (examples / "refund_desk").is_dir():
        fail("mesh demo runs from a source checkout (its examples/ folder was not found)")
    sys.path.insert(0, str(examples))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(examples), os.environ.get("PYTHONPATH")) if p
    )


@app.command("config")
def config(as_json: JsonOpt = False) -> None:
    """Print the settings in force (environment, mesh.toml, defaults)."""
    data = settings().model_dump()
    if as_json:
        emit_json(data)
        return
    table = Table("setting", "value", "env var")
    for k, v in data.items():
        table.add_row(k, str(v), f"MESH_{k.upper()}")
    out.print(table)


def _is_usage_error(exc: Exception) -> bool:
    """Click's usage errors; typer >= 0.20 raises those of its own vendored click copy."""
    kinds: list[type[Exception]] = []
    for module in ("typer._click", "click"):  # a clean install may have only the vendored one
        try:
            kinds.append(importlib.import_module(module).ClickException)
        except ImportError:
            pass
    return isinstance(exc, tuple(kinds))


def main() -> None:
    """Entry point: turns known failures into one red line and a meaningful exit code."""
    import asyncpg
    import pydantic
    import redis.exceptions
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from agentmesh.devstack import StackError
    from agentmesh.outbox.replay import ReplayError

    try:
        code = app(standalone_mode=False)  # click returns (not raises) the code of typer.Exit
        if isinstance(code, int) and code:
            sys.exit(code)
    except CliError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(exc.code)
    except (redis.exceptions.ConnectionError, ConnectionRefusedError, OSError) as exc:
        err.print(f"[red]error:[/] cannot reach a server: {exc}", highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except KafkaConnectionError as exc:
        err.print(f"[red]error:[/] cannot reach Kafka: {exc}", highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except (KafkaError, ReplayError) as exc:
        err.print(f"[red]error:[/] Kafka: {exc}", highlight=False)
        sys.exit(EXIT_FAILED)
    except asyncpg.PostgresError as exc:
        err.print(f"[red]error:[/] PostgreSQL: {exc}", highlight=False)
        sys.exit(EXIT_FAILED)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        err.print(f"[red]error:[/] invalid setting {where}: {first['msg']}", highlight=False)
        sys.exit(EXIT_INPUT)
    except StackError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(EXIT_FAILED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        if _is_usage_error(exc):
            cast(Any, exc).show()
            sys.exit(EXIT_INPUT)
        if os.environ.get("MESH_DEBUG"):
            raise
        err.print(
            f"[red]error:[/] unexpected {type(exc).__name__}: {exc} "
            "(run with MESH_DEBUG=1 for the traceback)",
            highlight=False,
        )
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
