"""structlog set-up: readable console lines by default, JSON lines for log shippers."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import structlog

#: Client libraries that log one line per failed request while a server is down.
NOISY_LIBRARIES = ("aiokafka", "kafka")


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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    for name in NOISY_LIBRARIES:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.propagate = False
