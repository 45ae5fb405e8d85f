"""The `mesh` command: the typer app, its command groups, and the one place where failures
become a red line and an exit code.

Exit codes: 0 ok, 1 the operation failed, 2 bad input (usage, invalid payload),
3 a server (Redis, PostgreSQL, Kafka) is unreachable, 4 backpressure, 5 the credential lacks
the right.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, Any, cast

import asyncpg
import pydantic
import redis.exceptions
import typer
from aiokafka.errors import KafkaConnectionError, KafkaError
from rich.table import Table

from agentmesh._version import __version__
from agentmesh.cli import access, agent, audit, demo, dev, dlq, projection, sessions, status
from agentmesh.cli.common import (
    EXIT_FAILED,
    EXIT_FORBIDDEN,
    EXIT_INPUT,
    EXIT_UNAVAILABLE,
    CliError,
    JsonOpt,
    emit_json,
    err,
    out,
    safe,
    settings,
)
from agentmesh.client.errors import InvalidRequest, MeshError
from agentmesh.devstack import StackError
from agentmesh.outbox.replay import ReplayError
from agentmesh.process import redact
from agentmesh.process.logs import configure
from agentmesh.settings import SECRET_FIELDS, Settings


def _version(value: bool) -> None:
    if value:
        out.print(f"mesh {__version__}", highlight=False)
        raise typer.Exit()


app = typer.Typer(
    name="mesh",
    help="agentmesh: AI agents as a choreographed mesh over Redis Streams, Postgres and Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """agentmesh: AI agents as a choreographed mesh over Redis Streams, Postgres and Kafka."""


app.add_typer(dev.dev_app, name="dev")
app.add_typer(dev.db_app, name="db")
app.add_typer(agent.agent_app, name="agent")
app.add_typer(audit.relay_app, name="relay")
app.add_typer(audit.outbox_app, name="outbox")
app.add_typer(dlq.dlq_app, name="dlq")
app.add_typer(access.access_app, name="access")
app.add_typer(projection.projection_app, name="projection")
app.command("publish")(agent.publish)
app.command("replay")(audit.replay)
app.command("sessions")(sessions.sessions_cmd)
app.command("session")(sessions.session_cmd)
app.command("approve")(sessions.approve_cmd)
app.command("reject")(sessions.reject_cmd)
app.command("status")(status.status)
app.command("demo")(demo.demo)


@app.command("config")
def config(as_json: JsonOpt = False) -> None:
    """Print the settings in force (environment, mesh.toml, defaults); secrets as ***."""
    data = config_view(settings())
    if as_json:
        emit_json(data)
        return
    table = Table("setting", "value", "env var")
    for k, v in data.items():
        table.add_row(safe(k), safe(v), safe(f"MESH_{k.upper()}"))
    out.print(table)


def config_view(s: Settings) -> dict[str, Any]:
    """The settings as `mesh config` shows them: a secret is "***" when set (None when not),
    and a password inside the Redis URL or the DSN is masked."""
    data = s.model_dump(mode="json")
    for name in SECRET_FIELDS:
        data[name] = None if data[name] is None else redact.MASK
    return {k: redact.redact(v) if isinstance(v, str) else v for k, v in data.items()}


def _is_usage_error(exc: Exception) -> bool:
    """Click's usage errors; typer >= 0.20 raises those of its own vendored click copy."""
    kinds: list[type[Exception]] = []
    for module in ("typer._click", "click"):  # a clean install may have only the vendored one
        try:
            kinds.append(importlib.import_module(module).ClickException)
        except ImportError:
            pass
    return isinstance(exc, tuple(kinds))


def _line(message: str, code: int) -> None:
    """The one line a failure prints: its message may quote values from the wire, so safe()
    (markup escaped, newlines and other control characters shown as escapes, cut)."""
    err.print(f"[red]error:[/] {safe(redact.redact(message), 2000)}", highlight=False)
    sys.exit(code)


def main() -> None:
    """Entry point: turns known failures into one red line and a meaningful exit code."""
    # Logs go to stderr from the start, warnings and worse, so a command that runs library
    # code without configuring logs itself (a one-shot relay under `outbox republish --json`)
    # cannot print a log line into the JSON on stdout. Long-running commands reconfigure.
    configure(level="WARNING")
    try:
        code = app(standalone_mode=False)  # click returns (not raises) the code of typer.Exit
        if isinstance(code, int) and code:
            sys.exit(code)
    except CliError as exc:
        _line(str(exc), exc.code)
    except InvalidRequest as exc:
        _line(str(exc), EXIT_INPUT)
    except MeshError as exc:
        _line(str(exc), EXIT_FAILED)
    except (asyncpg.InsufficientPrivilegeError, redis.exceptions.NoPermissionError) as exc:
        _line(f"permission denied: {exc}", EXIT_FORBIDDEN)
    except (redis.exceptions.ConnectionError, ConnectionRefusedError, OSError) as exc:
        _line(f"cannot reach a server: {exc}", EXIT_UNAVAILABLE)
    except KafkaConnectionError as exc:
        _line(f"cannot reach Kafka: {exc}", EXIT_UNAVAILABLE)
    except (KafkaError, ReplayError) as exc:
        _line(f"Kafka: {exc}", EXIT_FAILED)
    except asyncpg.PostgresError as exc:
        _line(f"PostgreSQL: {exc}", EXIT_FAILED)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        _line(f"invalid setting {where}: {first['msg']}", EXIT_INPUT)
    except StackError as exc:
        _line(str(exc), EXIT_FAILED)
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
        _line(f"unexpected {type(exc).__name__}: {exc} (run with MESH_DEBUG=1 for the traceback)",
              EXIT_FAILED)  # fmt: skip
