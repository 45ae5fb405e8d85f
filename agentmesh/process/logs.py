"""structlog set-up: readable console lines by default, JSON lines for log shippers.

Client libraries log through the standard library; their loggers that speak up during a
server outage share one handler that makes each error one line (`OneLineErrors`: no
traceback for a lost connection) and lets a repeated line through once per window
(`RepeatFilter`).

Every line, structlog's and the libraries', is redacted as a whole after it is rendered
(`agentmesh.process.redact`): a password in a URL that an error message quotes, a secret
setting's value, a bearer token never reach the log, tracebacks included."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import aiokafka.errors
import asyncpg
import redis.exceptions
import structlog

from agentmesh.process.redact import redact

#: Client libraries that log one line per failed request while a server is down.
NOISY_LIBRARIES = ("aiokafka", "kafka")
#: Loggers whose records carry a traceback for what is only a server outage: asyncpg's pool
#: logs one each time it fails to reconnect its minimum of connections ("Failed to restore
#: the pool connection floor"); asyncio logs one for a connection error nobody retrieved
#: ("Future exception was never retrieved"). Both become one line (`OneLineErrors`).
OUTAGE_LOGGERS = ("asyncpg", "asyncio")
#: Errors that mean a server went away (or never answered), not a bug.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, timed out, unresolved host
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # "connection was closed in the middle of operation"
    asyncpg.exceptions.OperatorInterventionError,  # "the database system is shutting down"
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    aiokafka.errors.KafkaConnectionError,
)


class OneLineErrors(logging.Filter):
    """Turn a record's traceback into one line, "message (ErrorType: error)", when the error
    is a server outage (OUTAGE_ERRORS), or for any error of a logger under `whole_loggers`
    (asyncpg logs exceptions only about its connections). Other tracebacks (bugs) are kept.

    A server outage is expected and handled (the process retries); a traceback for each
    failed reconnect only buries what matters. With RepeatFilter after it, the line also
    comes at most once per window."""

    def __init__(self, whole_loggers: tuple[str, ...] = ("asyncpg",)) -> None:
        super().__init__()
        self.whole_loggers = whole_loggers

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        whole = record.name.split(".")[0] in self.whole_loggers
        if not whole and not isinstance(exc, OUTAGE_ERRORS):
            return True
        text = str(exc).strip().splitlines()
        summary = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        message = "; ".join(line.strip() for line in record.getMessage().splitlines())
        record.msg = f"{message} ({summary})"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


class RepeatFilter(logging.Filter):
    """Let a library's message through once per `window_s`; count what it held back.

    During a broker outage aiokafka logs the same error for every fetch, hundreds a second;
    operators need to see it once, and how often it happened."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        held = last[1] if last is not None else 0
        self._seen[key] = (now, 0)
        if len(self._seen) > 1000:  # messages carry changing details; keep the map small
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.getMessage()} (and {held} more like it in {self.window_s:g}s)"
            record.args = ()
        return True


class RedactingFormatter(logging.Formatter):
    """The standard library's line (traceback included) with secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def redacting(renderer: Any) -> Callable[[Any, str, Any], str]:
    """A structlog renderer whose output has secrets masked."""

    def render(logger: Any, method: str, event_dict: Any) -> str:
        return redact(str(renderer(logger, method, event_dict)))

    return render


class _CurrentStderr(structlog.PrintLogger):
    """Writes to whatever `sys.stderr` is now, and never raises: a CLI runner (or a test
    harness) may swap stderr for a stream it later closes, and a log line must never become
    the caller's error (a relay took one for a broker outage)."""

    def msg(self, message: str) -> None:
        try:
            print(message, file=sys.stderr, flush=True)
        except (ValueError, OSError):
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure(*, fmt: str = "console", level: str = "INFO") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redacting(renderer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: _CurrentStderr(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    handler.addFilter(OneLineErrors())  # first: RepeatFilter then sees the one-line message
    handler.addFilter(RepeatFilter())
    for name in (*NOISY_LIBRARIES, *OUTAGE_LOGGERS):
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.propagate = False
