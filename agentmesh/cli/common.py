"""What every `mesh` command shares: consoles, exit codes, options, JSON output, errors.

Commands import this module at the top and nothing else of the CLI; the library (Mesh,
the runtime) never imports the CLI.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import re
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

# emoji=False: ":smile:" in a value from the wire is text, not an emoji.
out = Console(width=None if sys.stdout.isatty() else 160, emoji=False)  # piped: no wrap at 80
err = Console(stderr=True, soft_wrap=True, emoji=False)

#: 0 ok, 1 the operation failed, 2 bad input (usage, invalid payload), 3 a server is unreachable.
EXIT_FAILED, EXIT_INPUT, EXIT_UNAVAILABLE = 1, 2, 3
#: 4: the target stream's backlog is over MESH_PUBLISH_MAX_BACKLOG (nothing published; retry).
EXIT_BACKPRESSURE = 4

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


#: Deepest nesting emit_json writes; deeper (never from a decoded DLQ entry, whose envelope
#: is at most 64 deep) becomes "…".
JSON_MAX_DEPTH = 100


def emit_json(data: Any) -> None:
    """`data` as one JSON document on stdout, ASCII only (lone surrogates and control
    characters as \\u escapes), whatever it holds: other types as their str()."""
    text = json.dumps(_jsonable(data, JSON_MAX_DEPTH), ensure_ascii=True, allow_nan=False)
    sys.stdout.write(text + "\n")


def _jsonable(value: Any, depth: int) -> Any:
    """`value` with only what JSON can hold: str keys, finite floats, ints json can print."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value if value.bit_length() < 10_000 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if depth <= 0:
            return "…"
        if isinstance(value, dict):
            return {_key(k): _jsonable(v, depth - 1) for k, v in value.items()}
        return [_jsonable(v, depth - 1) for v in value]
    return _str(value)


def _key(key: Any) -> str:
    return key if isinstance(key, str) else _str(key)


def _str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a str() that raises (an int too long to print, a broken __str__)
        return object.__repr__(value)


# What must not reach a terminal as it is: C0 controls, DEL, C1 controls, lone surrogates,
# the line/paragraph separators and every Unicode format character (category Cf: bidi
# overrides and isolates, zero-width characters, the BOM, tags). UNSAFE_LINES lets \t and
# \n through.
_FORMAT = (
    r"\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    r"\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000110bd\U000110cd"
    r"\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    r"\U000e0020-\U000e007f"
)
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f" + _FORMAT + "]")
UNSAFE_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f" + _FORMAT + "]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe(value: object, max_len: int | None = None, *, lines: bool = False) -> str:
    """Text from the wire, made inert for rich and the terminal: cut to `max_len` characters
    (then "…"), every control or format character and lone surrogate shown as an escape
    (ESC as the text \\x1b, U+202E as \\u202e), rich markup escaped. `lines` keeps newlines
    and tabs (a traceback, a pretty-printed envelope). Every value a view prints that came
    from Redis, Kafka or Postgres goes through here."""
    text = value if isinstance(value, str) else _str(value)
    if max_len is not None and len(text) > max_len:
        text = text[: max(0, max_len - 1)] + "…"
    return escape((UNSAFE_LINES if lines else UNSAFE).sub(_visible, text))


def json_text(
    data: Any,
    *,
    max_depth: int = 12,
    max_items: int = 200,
    max_str: int = 2000,
    max_lines: int = 5000,
) -> str:
    """`data` pretty-printed as JSON for people, bounded: containers deeper than `max_depth`
    as {…} / […], at most `max_items` items each, strings cut at `max_str`, at most
    `max_lines` lines. Plain text, not yet safe(): print it through safe(..., lines=True)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v if len(v) <= max_str else v[:max_str] + "…", ensure_ascii=False)
        try:
            return json.dumps(v)
        except (TypeError, ValueError):
            return json.dumps(_str(v), ensure_ascii=False)

    def walk(v: Any, pad: str, head: str, tail: str, depth: int) -> None:
        if len(lines) > max_lines:
            return
        if not isinstance(v, (dict, list, tuple)):
            lines.append(f"{pad}{head}{scalar(v)}{tail}")
            return
        opening, closing = ("{", "}") if isinstance(v, dict) else ("[", "]")
        if not v or depth >= max_depth:
            lines.append(f"{pad}{head}{opening}{'…' if v else ''}{closing}{tail}")
            return
        lines.append(f"{pad}{head}{opening}")
        items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
        shown = items[:max_items]
        for i, (k, x) in enumerate(shown, 1):
            key = "" if k is None else scalar(_key(k)) + ": "
            more = i < len(shown) or len(items) > len(shown)
            walk(x, pad + "  ", key, "," if more else "", depth + 1)
        if len(items) > len(shown):
            lines.append(f"{pad}  … {len(items) - len(shown)} more")
        lines.append(f"{pad}{closing}{tail}")

    walk(data, "", "", "", 0)
    if len(lines) > max_lines:
        lines[max_lines:] = [f"… (cut at {max_lines} lines; --json shows it whole)"]
    return "\n".join(lines)


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
