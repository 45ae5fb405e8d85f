"""Dead-letter records: the original entry verbatim, plus why it failed and how often.

A DLQ entry must let an operator fix and re-drive the message by hand, so it keeps the raw
bytes (even when they are not valid JSON) and everything known about the failures.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agentmesh.bus.entry import StreamEntry


def _now() -> str:
    return datetime.now(UTC).isoformat()


def short_traceback(exc: BaseException, limit: int = 6) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=limit))[
        -4000:
    ]


@dataclass(kw_only=True)
class DeadLetter:
    entry: StreamEntry
    group: str
    agent: str
    reason: str  # stable short code: malformed_json, unknown_type, max_deliveries, ...
    error_type: str
    error: str
    traceback: str = ""
    first_failure: str = field(default_factory=_now)
    last_failure: str = field(default_factory=_now)

    @classmethod
    def from_exception(
        cls,
        entry: StreamEntry,
        exc: BaseException,
        *,
        reason: str,
        group: str,
        agent: str,
        with_traceback: bool = True,
    ) -> DeadLetter:
        return cls(
            entry=entry,
            group=group,
            agent=agent,
            reason=reason,
            error_type=type(exc).__name__,
            error=str(exc)[:2000],
            traceback=short_traceback(exc) if with_traceback else "",
        )

    def fields(self) -> dict[str, bytes | str | int]:
        return {
            "envelope": self.entry.raw,
            "stream": self.entry.stream,
            "entry_id": self.entry.id,
            "group": self.group,
            "agent": self.agent,
            "reason": self.reason,
            "error_type": self.error_type,
            "error": self.error,
            "traceback": self.traceback,
            "deliveries": self.entry.deliveries,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
            "dead_lettered_at": _now(),
        }
