"""`mesh dlq`: look into the dead-letter stream without writing XRANGE scripts.

A DLQ entry is the original bytes plus why and how often it failed (see bus/deadletter.py);
its id is the DLQ stream's entry id. retry, drop and edit are recorded in the audit log
(outbox/operator.py) with the operator's identity and reason *before* they are carried out,
and each is one Lua step in Redis, so two operators acting on one entry cannot both win.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, cast

import typer
from rich.table import Table

dlq_app = typer.Typer(help="Inspect the dead-letter queue.", no_args_is_help=True)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        from agentmesh.cli import EXIT_INPUT, fail

        fail(f"bad age {text!r}: use a number with s, m, h or d (e.g. 15m)", EXIT_INPUT)
    return float(match[1]) * _UNIT_S[match[2]]


@dataclass(kw_only=True)
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


Page = list[tuple[bytes, dict[bytes, bytes]]]


async def _xrange(redis: Any, stream: str, lo: str, hi: str, count: int | None = None) -> Page:
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


@dataclass(kw_only=True)
class DlqFilter:
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


async def read_dlq(redis_url: str, dlq_stream: str, flt: DlqFilter) -> list[DlqEntry]:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        now = time.time()
        entries: list[DlqEntry] = []
        start = "-"
        while True:  # page through, so a DLQ of a million entries does not blow memory twice
            page = await _xrange(redis, dlq_stream, start, "+", 1000)
            entries += [e for e in (to_entry(i, f, now) for i, f in page) if flt.matches(e)]
            if len(page) < 1000:
                return entries
            start = "(" + page[-1][0].decode()
    finally:
        await redis.aclose()


async def read_one(redis_url: str, dlq_stream: str, ident: str) -> DlqEntry | None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        page = await _xrange(redis, dlq_stream, ident, ident)
        return to_entry(page[0][0], page[0][1], time.time()) if page else None
    finally:
        await redis.aclose()


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
StreamOpt = Annotated[str | None, typer.Option("--stream", help="Original stream.")]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="Agent that gave up.")]
MatchOpt = Annotated[str | None, typer.Option("--match", help="Text in the reason or error.")]
OlderOpt = Annotated[str | None, typer.Option("--older-than", help="Age, e.g. 15m, 2h.")]
NewerOpt = Annotated[str | None, typer.Option("--newer-than", help="Age, e.g. 30s, 1d.")]


@dlq_app.command("list")
def dlq_list(
    stream: StreamOpt = None,
    agent: AgentOpt = None,
    match: MatchOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dead-lettered messages, oldest first, with why they failed."""
    from agentmesh.cli import emit_json, out, run, settings

    s = settings()
    flt = make_filter(stream, agent, match, older_than, newer_than)
    entries = run(read_dlq(s.redis_url, s.dlq_stream, flt))
    if as_json:
        emit_json([{**_summary(e)} for e in entries])
        return
    table = Table("id", "age", "stream", "agent", "type", "session", "reason", "tries", "error")
    for e in entries:
        table.add_row(
            e.id,
            _age(e.age_s),
            e.stream,
            e.agent,
            e.event_type,
            e.session_id,
            e.reason,
            str(e.deliveries),
            e.error[:60],
        )
    out.print(table)
    out.print(f"{len(entries)} dead-lettered message(s) in {s.dlq_stream}")


def make_filter(
    stream: str | None,
    agent: str | None,
    match: str | None,
    older_than: str | None,
    newer_than: str | None,
) -> DlqFilter:
    return DlqFilter(
        stream=stream,
        agent=agent,
        reason=match,
        older_than_s=parse_age(older_than) if older_than else None,
        newer_than_s=parse_age(newer_than) if newer_than else None,
    )


def _summary(e: DlqEntry) -> dict[str, Any]:
    data = asdict(e)
    data.pop("traceback")
    data.pop("raw")
    data.update(event_type=e.event_type, session_id=e.session_id)
    return data


@dlq_app.command("show")
def dlq_show(
    ident: Annotated[str, typer.Argument(metavar="ID", help="DLQ entry id (from dlq list).")],
    as_json: JsonOpt = False,
) -> None:
    """One dead-lettered message: its full envelope, the reason and its delivery history."""
    from agentmesh.cli import EXIT_FAILED, EXIT_INPUT, emit_json, fail, out, run, settings

    if not re.fullmatch(r"\d+-\d+", ident):
        fail(f"bad DLQ id {ident!r}: expected an id like 1700000000000-0", EXIT_INPUT)
    s = settings()
    entry = run(read_one(s.redis_url, s.dlq_stream, ident))
    if entry is None:
        fail(f"no DLQ entry {ident} in {s.dlq_stream}", EXIT_FAILED)
    if as_json:
        emit_json(
            {
                **_summary(entry),
                "traceback": entry.traceback,
                "event_type": entry.event_type,
                "session_id": entry.session_id,
            }
        )
        return
    table = Table("field", "value", show_header=False)
    for name, value in (
        ("DLQ id", entry.id),
        ("age", _age(entry.age_s)),
        ("from", f"{entry.stream} entry {entry.entry_id} (group {entry.group})"),
        ("agent", entry.agent),
        ("reason", entry.reason),
        ("error", f"{entry.error_type}: {entry.error}"),
        ("deliveries", str(entry.deliveries)),
        ("first failure", entry.first_failure),
        ("last failure", entry.last_failure),
        ("dead-lettered", entry.dead_lettered_at),
    ):
        table.add_row(name, value)
    out.print(table)
    out.print("envelope:")
    if isinstance(entry.envelope, str):
        out.print(entry.envelope, markup=False, highlight=False)
    else:
        out.print_json(data=entry.envelope)
    if entry.traceback:
        out.print("traceback:")
        out.print(entry.traceback, markup=False, highlight=False)
