"""A dead-lettered message as an operator sees it, read from the DLQ stream.

A DLQ entry is the original bytes plus why and how often it failed (see bus/deadletter.py);
its id is the DLQ stream's entry id.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

#: How many entries one XRANGE reads, so a DLQ of a million entries does not blow memory twice.
PAGE = 1000

Page = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass(frozen=True, kw_only=True)
class DlqEntry:
    id: str
    age_s: float
    stream: str
    entry_id: str
    group: str
    agent: str
    reason: str
    error_type: str
    error: str
    traceback: str
    deliveries: int
    first_failure: str
    last_failure: str
    dead_lettered_at: str
    envelope: Any  # the decoded JSON, or the raw text when it is not JSON
    raw: bytes = b""  # the envelope bytes, verbatim (what a retry puts back)

    @property
    def event_type(self) -> str:
        return str(self.envelope.get("type", "?")) if isinstance(self.envelope, dict) else "?"

    @property
    def session_id(self) -> str:
        env = self.envelope
        return str(env.get("session_id", "?")) if isinstance(env, dict) else "?"


@dataclass(frozen=True, kw_only=True)
class DlqFilter:
    """Which entries: every condition given must hold; none given selects every entry."""

    stream: str | None = None
    agent: str | None = None
    reason: str | None = None  # text, matched case-insensitively in the reason code and error
    older_than_s: float | None = None
    newer_than_s: float | None = None

    def matches(self, e: DlqEntry) -> bool:
        text = self.reason.lower() if self.reason else None
        return (
            (self.stream is None or e.stream == self.stream)
            and (self.agent is None or e.agent == self.agent)
            and (text is None or text in e.reason.lower() or text in e.error.lower())
            and (self.older_than_s is None or e.age_s >= self.older_than_s)
            and (self.newer_than_s is None or e.age_s <= self.newer_than_s)
        )


async def xrange(redis: Redis, stream: str, lo: str, hi: str, count: int | None = None) -> Page:
    return cast(Page, await redis.xrange(stream, min=lo, max=hi, count=count))


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", errors="replace")


def to_entry(entry_id: bytes | str, fields: dict[bytes, bytes], now: float) -> DlqEntry:
    ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    raw = _text(fields.get(b"envelope"))
    try:
        envelope: Any = json.loads(raw)
    except json.JSONDecodeError:
        envelope = raw
    return DlqEntry(
        id=ident,
        age_s=max(0.0, now - int(ident.split("-")[0]) / 1000),
        stream=_text(fields.get(b"stream")),
        entry_id=_text(fields.get(b"entry_id")),
        group=_text(fields.get(b"group")),
        agent=_text(fields.get(b"agent")),
        reason=_text(fields.get(b"reason")),
        error_type=_text(fields.get(b"error_type")),
        error=_text(fields.get(b"error")),
        traceback=_text(fields.get(b"traceback")),
        deliveries=int(fields.get(b"deliveries") or 0),
        first_failure=_text(fields.get(b"first_failure")),
        last_failure=_text(fields.get(b"last_failure")),
        dead_lettered_at=_text(fields.get(b"dead_lettered_at")),
        envelope=envelope,
        raw=fields.get(b"envelope") or b"",
    )


async def read_all(redis: Redis, dlq_stream: str, flt: DlqFilter) -> list[DlqEntry]:
    """The entries `flt` matches, oldest first, read PAGE at a time."""
    now = time.time()
    entries: list[DlqEntry] = []
    start = "-"
    while True:
        page = await xrange(redis, dlq_stream, start, "+", PAGE)
        entries += [e for e in (to_entry(i, f, now) for i, f in page) if flt.matches(e)]
        if len(page) < PAGE:
            return entries
        start = "(" + page[-1][0].decode()


async def read_one(redis: Redis, dlq_stream: str, dlq_id: str) -> DlqEntry | None:
    page = await xrange(redis, dlq_stream, dlq_id, dlq_id)
    return to_entry(page[0][0], page[0][1], time.time()) if page else None
