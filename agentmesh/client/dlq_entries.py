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

from agentmesh.schemas.depth import MAX_DEPTH, too_deep

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
    envelope: Any  # the decoded JSON, or the raw text (as far as it is text) when it is not
    raw: bytes = b""  # the envelope bytes, verbatim (what a retry puts back)
    envelope_error: str = ""  # why `envelope` is raw text (or shown with U+FFFD); "" when fine

    @property
    def event_type(self) -> str:
        return _field(self.envelope, "type")

    @property
    def session_id(self) -> str:
        return _field(self.envelope, "session_id")


def _field(envelope: Any, key: str) -> str:
    """A top-level text field of an envelope from the wire, which may be any JSON at all: the
    text itself, another value as compact JSON (cut), "?" when missing or not an object."""
    value = envelope.get(key, "?") if isinstance(envelope, dict) else "?"
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str, separators=(",", ":"))[:200]
    except (ValueError, TypeError, RecursionError):
        return "?"


def decode_envelope(raw: bytes) -> tuple[Any, str]:
    """(the envelope for display, "" or why it is not decoded JSON); never raises.

    Bytes that are not UTF-8 are shown with U+FFFD in their place (the entry's `raw` keeps
    them as they were); JSON nested deeper than MAX_DEPTH, or not JSON at all, stays text."""
    try:
        text, error = raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        error = f"not valid UTF-8 (byte {exc.start}; shown as U+FFFD)"
    if too_deep(raw):
        return text, f"nested deeper than {MAX_DEPTH} levels: not decoded"
    also = f"{error}; " if error else ""
    try:
        return json.loads(text), error
    except json.JSONDecodeError as exc:
        return text, f"{also}not JSON: {exc}"
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. an int of 5000 digits
        return text, f"{also}not decodable: {type(exc).__name__}: {exc}"[:300]


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


def _int(value: bytes | None) -> int:
    try:
        return int(value or 0)
    except ValueError:  # not a number, or more digits than int() takes
        return 0


def _age_s(ident: str, now: float) -> float:
    try:
        return max(0.0, now - int(ident.split("-")[0]) / 1000)
    except ValueError:
        return 0.0


def to_entry(entry_id: bytes | str, fields: dict[bytes, bytes], now: float) -> DlqEntry:
    """A DLQ stream entry as an operator sees it. Never raises, whatever the fields hold: a
    producer may have written anything, and one such entry must not hide the others."""
    ident = _text(entry_id) if isinstance(entry_id, bytes) else entry_id
    raw = fields.get(b"envelope") or b""
    envelope, envelope_error = decode_envelope(raw)
    return DlqEntry(
        id=ident,
        age_s=_age_s(ident, now),
        stream=_text(fields.get(b"stream")),
        entry_id=_text(fields.get(b"entry_id")),
        group=_text(fields.get(b"group")),
        agent=_text(fields.get(b"agent")),
        reason=_text(fields.get(b"reason")),
        error_type=_text(fields.get(b"error_type")),
        error=_text(fields.get(b"error")),
        traceback=_text(fields.get(b"traceback")),
        deliveries=_int(fields.get(b"deliveries")),
        first_failure=_text(fields.get(b"first_failure")),
        last_failure=_text(fields.get(b"last_failure")),
        dead_lettered_at=_text(fields.get(b"dead_lettered_at")),
        envelope=envelope,
        raw=raw,
        envelope_error=envelope_error,
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
