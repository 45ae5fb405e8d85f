"""What every `mesh` command shares: consoles, exit codes, options, JSON output, errors.

Commands import this module at the top and nothing else of the CLI; the library (Mesh,
the runtime) never imports the CLI.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agentmesh.agents.agent import AGENTS, Agent
from agentmesh.settings import Settings, load_settings

T = TypeVar("T")

out = Console(width=None if sys.stdout.isatty() else 160)  # piped output: do not wrap at 80
err = Console(stderr=True, soft_wrap=True)

#: 0 ok, 1 the operation failed, 2 bad input (usage, invalid payload), 3 a server is unreachable.
EXIT_FAILED, EXIT_INPUT, EXIT_UNAVAILABLE = 1, 2, 3

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ModuleOpt = Annotated[
    str | None,
    typer.Option("--module", "-m", help="Module defining the agents (MESH_AGENTS_MODULE)."),
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")]


class CliError(Exception):
    """A failure the operator can act on: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    raise CliError(message, code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def safe(value: object) -> str:
    """Text from the wire, made inert for a rich table: markup escaped."""
    return escape(str(value))


def load_agents(module: str | None) -> dict[str, Agent]:
    """Import the module that defines the agents (and so registers their event types)."""
    name = module or settings().agents_module
    if not name:
        fail("MESH_AGENTS_MODULE is not set: name the module that defines your agents "
             "(or pass --module)", EXIT_INPUT)  # fmt: skip
    try:
        importlib.import_module(name)
    except ImportError as exc:
        fail(f"cannot import agents module {name!r}: {exc}", EXIT_INPUT)
    return AGENTS


def read_json_arg(raw: str, what: str = "payload") -> Any:
    """JSON from the argument itself, `@file`, or `-` (stdin)."""
    if raw == "-":
        raw = sys.stdin.read()
    elif raw.startswith("@"):
        path = Path(raw[1:])
        if not path.is_file():
            fail(f"{what} file {path} not found", EXIT_INPUT)
        raw = path.read_text()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"{what} is not valid JSON: {exc}", EXIT_INPUT)


def ago(seconds: float) -> str:
    """90 -> '2m': an age for a table cell."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def ago_ts(ts: datetime) -> str:
    return ago((datetime.now(UTC) - ts).total_seconds())


def spinner(text: str, enabled: bool = True) -> Any:
    """A spinner on stdout while something slow runs; nothing when output is for scripts."""
    return out.status(text) if enabled else nullcontext()


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar on stderr; the yielded `update(done, total)` moves it."""
    if not enabled or not err.is_terminal:
        yield lambda done, total: None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
