"""Every `mesh` view renders whatever bytes a producer wrote: DLQ entries planted with XADD
(deep nesting, bytes that are not UTF-8, lone surrogates, rich markup, ANSI and OSC escapes,
carriage returns, bidi overrides, a megabyte string, envelopes of the wrong shape) list and
show with exit 0, nothing that steers a terminal on stdout, JSON that parses, no traceback;
a retry puts back exactly the bytes that were there; a replayed timeline renders the same."""

from __future__ import annotations

import io
import json
import re
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest
from redis.asyncio import Redis
from rich.console import Console

from agentmesh.cli.common import emit_json, safe
from agentmesh.cli.timeline import render
from agentmesh.client.dlq_entries import to_entry
from agentmesh.outbox.replay import Replay, ReplayedEvent
from agentmesh.schemas import Envelope
from agentmesh.schemas.audit import ACTION
from tests.helpers import job, mesh

DLQ = "mesh:dlq"
MB = 1_000_000
MAX_DEPTH = 64  # agentmesh.client.dlq_entries.MAX_DEPTH

#: What must never reach stdout or stderr: C0 controls but newline (ESC, CR, BEL, ...), DEL,
#: C1 controls, bidi overrides and isolates, line separators.
STEERING = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _envelope(**over: Any) -> dict[str, Any]:
    env: dict[str, Any] = json.loads(job(1, session="s-hostile").to_json())
    env.update(over)
    return env


def _wire(env: Any) -> bytes:
    return json.dumps(env).encode()


def _fields(envelope: bytes, **over: bytes | str) -> dict[bytes, bytes]:
    """A DLQ entry as bus/deadletter.py writes one, with any field overridden."""
    now = datetime.now(UTC).isoformat()
    fields: dict[str, bytes | str] = {
        "envelope": envelope, "stream": "t:jobs", "entry_id": "1-0", "group": "g-workers",
        "agent": "worker", "reason": "malformed_json", "error_type": "ValueError",
        "error": "bad input", "traceback": "ValueError: bad input\n  at line 1\n",
        "deliveries": "1", "first_failure": now, "last_failure": now, "dead_lettered_at": now,
    }  # fmt: skip
    fields.update(over)
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


_OSC = "\x1b]8;;http://evil\x07click\x1b]8;;\x07"
_DEEP = b"[" * 5000 + b"]" * 5000

HOSTILE: dict[str, dict[bytes, bytes]] = {
    "deep_nesting": _fields(_DEEP),
    "deep_inside_envelope": _fields(_wire(_envelope())[:-1] + b', "deep": ' + _DEEP + b"}"),
    "invalid_utf8": _fields(
        _wire(_envelope(session_id="s-BAD")).replace(b"BAD", b"\xff\xfe\xc3"),
        error=b"bad \xff\xfe byte",
        agent=b"work\xc3er",
    ),
    "lone_surrogate_escape": _fields(
        _wire(_envelope(session_id="s-SURR")).replace(b"SURR", b"\\ud800"),
        error=b"surrogate \xed\xa0\x80 raw",
    ),
    "lone_surrogate_bytes": _fields(
        _wire(_envelope(session_id="s-SURR")).replace(b"SURR", b"\xed\xa0\x80"),
    ),
    "markup": _fields(
        _wire(
            _envelope(
                session_id="[/]",
                type="[link=http://x]click[/link]",
                payload={"[bold]": "[/]", "x": "[link=http://x]click[/link]"},
            )
        ),
        error="[bold]boom[/bold] [/]",
        agent="[/]",
        stream="[red]t:jobs",
    ),
    "ansi_escapes": _fields(
        _wire(_envelope(session_id="\x1b[31mred", type="\x1b[2J", payload={"osc": _OSC})),
        error=_OSC,
        agent="\x1b[31mworker\x1b[0m",
        reason="\x1b[1A\x1b[2K",
        traceback="\x1b]0;pwned title\x07 \x1bc",
    ),
    "carriage_return": _fields(
        _wire(_envelope(session_id="good\rEVIL", payload={"t": "ok\r\x1b[Kforged"})),
        error="fine\rFORGED LINE",
        agent="a\rb",
        traceback="line\r\nline2\r",
    ),
    "bidi_override": _fields(
        _wire(_envelope(session_id="s-\u202egnp.exe", payload={"f": "\u2066x\u2069\u202e"})),
        stream="t:\u202ejobs",
        error="\u202eright to left",
    ),
    "one_megabyte": _fields(
        _wire(_envelope(session_id="s" * MB, payload={"n": 1, "text": "x" * MB})),
        error="e" * MB,
        agent="a" * MB,
    ),
    "envelope_is_list": _fields(_wire([_envelope()])),
    "session_id_is_dict": _fields(_wire(_envelope(session_id={"$ne": 1}, type=["x", {"y": 1}]))),
    "not_json_text": _fields(b"\x1b[31m{not json\r\x9b\xe2\x80\xae [/] \x00\x7f"),
    "odd_numbers": _fields(
        b'{"n": NaN, "inf": Infinity, "big": ' + b"9" * 5000 + b"}", deliveries=b"lots"
    ),
    "odd_numbers_parsed": _fields(b'{"n": NaN, "inf": -Infinity, "x": 1e999}'),
    "c1_and_format": _fields(
        _wire(_envelope(session_id="s\x85\x9b31m\u200b\ufeff\U000e0041", source="\x7f")),
    ),
    "empty_and_missing": {b"reason": b"", b"deliveries": b"99999999999999999999999"},
}


async def _plant(redis: Redis, fields: dict[bytes, bytes]) -> str:
    ident = await redis.xadd(DLQ, cast(Any, fields))
    return cast(bytes, ident).decode()


async def _envelopes(redis: Redis, stream: str) -> list[bytes]:
    """The envelope field of every entry in `stream`, as stored."""
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(stream))
    return [fields[b"envelope"] for _, fields in rows]


def _strict_json(text: str) -> Any:
    """JSON as any parser must take it: NaN and Infinity are not JSON."""

    def no_constant(name: str) -> Any:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constant)


def _tame(r: Any, ident: str | None = None, code: int = 0) -> None:
    """Exit `code`, nothing that steers a terminal, no traceback, the entry's id shown."""
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-2000:]
    for name, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        bad = STEERING.search(text)
        assert bad is None, f"{name} holds {bad.group()!r} near {text[bad.start() - 40 :][:80]!r}"
        assert "Traceback (most recent call last)" not in text
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    if ident is not None:
        assert ident in r.stdout


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_dlq_views_render_a_hostile_entry(
    kind: str, base_env: dict[str, str], redis: Redis
) -> None:
    ident = await _plant(redis, HOSTILE[kind])

    table = mesh(base_env, "dlq", "list")
    _tame(table)
    assert "1 dead-lettered message(s)" in table.stdout
    assert ident in table.stdout

    listed = mesh(base_env, "dlq", "list", "--json")
    _tame(listed, ident)
    (row,) = _strict_json(listed.stdout)
    assert row["id"] == ident

    shown = mesh(base_env, "dlq", "show", ident)
    _tame(shown, ident)
    assert "envelope" in shown.stdout
    assert len(shown.stdout) < 200_000  # a megabyte value is cut in the human view

    as_json = mesh(base_env, "dlq", "show", ident, "--json")
    _tame(as_json, ident)
    data = _strict_json(as_json.stdout)
    assert data["id"] == ident
    assert isinstance(data["event_type"], str) and isinstance(data["session_id"], str)


async def test_one_hostile_entry_does_not_hide_the_others(
    base_env: dict[str, str], redis: Redis
) -> None:
    good = await _plant(redis, _fields(job(2, session="s-good").to_wire(), reason="max_deliveries"))
    ids = [good] + [await _plant(redis, f) for f in HOSTILE.values()]
    listed = mesh(base_env, "dlq", "list", "--json")
    _tame(listed)
    rows = _strict_json(listed.stdout)
    assert [r["id"] for r in rows] == ids
    assert rows[0]["session_id"] == "s-good" and rows[0]["envelope"]["payload"]["n"] == 2
    deep = rows[1 + list(HOSTILE).index("deep_nesting")]
    assert deep["envelope"] == _DEEP.decode() and "deeper than" in deep["envelope_error"]
    table = mesh(base_env, "dlq", "list")
    _tame(table)
    assert f"{len(ids)} dead-lettered message(s)" in table.stdout
    assert "max_deliveries" in table.stdout and all(i in table.stdout for i in ids)


async def test_show_renders_nesting_to_a_depth_then_an_ellipsis(
    base_env: dict[str, str], redis: Redis
) -> None:
    nested: Any = "bottom"
    for _ in range(MAX_DEPTH - 4):
        nested = {"k": nested}
    ident = await _plant(redis, _fields(_wire(_envelope(payload={"n": 1, "deep": nested}))))
    shown = mesh(base_env, "dlq", "show", ident)
    _tame(shown, ident)
    assert "{…}" in shown.stdout and "bottom" not in shown.stdout
    full = _strict_json(mesh(base_env, "dlq", "show", ident, "--json").stdout)
    assert "bottom" in json.dumps(full)  # --json has it whole
    assert full["envelope_error"] == ""


async def test_retry_puts_back_the_exact_bytes(
    base_env: dict[str, str], redis: Redis, pg: asyncpg.Connection
) -> None:
    """What an operator sees is decoded and made safe; what a retry puts back is the bytes."""
    env = _envelope(session_id="s-raw")
    env["payload"]["note"] = "NOTE"
    odd = '"\\u001b[31m[/]\\r\\u202e \\u00e9 \\ud83d\\ude00"'  # escapes JSON allows
    raw = json.dumps(env, indent=3).encode().replace(b'"NOTE"', odd.encode())
    ident = await _plant(redis, _fields(raw, error="\x1b[31m\r[/]"))
    shown = mesh(base_env, "dlq", "show", ident)
    _tame(shown, ident)
    assert '"\\u001b[31m[/]\\r\\u202e \u00e9 \U0001f600"' in shown.stdout  # decoded, made safe
    r = mesh(base_env, "dlq", "retry", ident, "--reason", "hostile but valid")
    _tame(r, ident)
    assert await _envelopes(redis, "t:jobs") == [raw]  # the bytes that were there, as they were
    assert await redis.xlen(DLQ) == 0

    for bad in (b"\xff\xfe", b"\xed\xa0\x80"):  # not UTF-8 (the second, a lone surrogate)
        await redis.delete("t:jobs")
        raw = _wire(_envelope(session_id="s-bytes")).replace(b"s-bytes", b"s-" + bad)
        ident = await _plant(redis, _fields(raw))
        shown = _strict_json(mesh(base_env, "dlq", "show", ident, "--json").stdout)
        assert "\ufffd" in shown["session_id"] and "UTF-8" in shown["envelope_error"]
        r = mesh(base_env, "dlq", "retry", ident, "--reason", "not utf-8")
        assert r.returncode in (0, 1), r.stdout + r.stderr
        _tame(r, ident, code=r.returncode)
        if r.returncode == 0:  # a registry that takes it: re-driven, byte for byte
            assert await _envelopes(redis, "t:jobs") == [raw]
        else:  # refused (no consumer would take it): left in the DLQ exactly as it was
            assert "invalid" in r.stdout
            assert await _envelopes(redis, DLQ) == [raw]
            await redis.delete(DLQ)


def test_an_error_line_neutralises_what_it_quotes(base_env: dict[str, str]) -> None:
    r = mesh(base_env, "dlq", "show", "\x1b[31m\r\u202e[/]")
    _tame(r, code=2)
    assert "[/]" in r.stderr and "\\x1b" in r.stderr and len(r.stderr.splitlines()) == 1


def test_the_error_line_is_one_line_of_visible_text(capsys: pytest.CaptureFixture[str]) -> None:
    from agentmesh.cli.app import _line

    with pytest.raises(SystemExit) as exit_:
        _line("bad value \x1b[31mred\r\u202e [/] [link=http://x]x[/link]\nsecond", 1)
    text = capsys.readouterr().err
    assert exit_.value.code == 1 and STEERING.search(text) is None
    assert text.count("\n") == 1 and "[/]" in text and "[link=http://x]" in text


# -- units: safe(), emit_json, json_text, to_entry, the timeline ------------------------------
def test_safe_makes_every_control_and_format_character_visible() -> None:
    assert safe("\x1b[31mred") == "\\x1b[31mred"
    assert safe("a\rb\nc\td\x7f\x85\u202e\ud800") == "a\\x0db\\x0ac\\x09d\\x7f\\x85\\u202e\\ud800"
    assert safe("a\nb\tc\r", lines=True) == "a\nb\tc\\x0d"
    assert safe("[link=http://x]click[/link] [/] [bold]") == (
        "\\[link=http://x]click\\[/link] \\[/] \\[bold]"
    )
    assert safe("x" * 100, 10) == "x" * 9 + "…"
    assert safe({"a": "\x1b"}) == "{'a': '\\x1b'}"
    for cp in range(0x110000):  # every format character (bidi, zero-width, tags) is caught
        if unicodedata.category(chr(cp)) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            assert safe(chr(cp)).startswith("\\"), hex(cp)


def test_emit_json_prints_one_valid_document_whatever_it_holds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    emit_json({"s": "\ud800\x1b\u202e", "n": float("nan"), "i": float("inf"), 1: b"x",
               "t": (1, 2), "big": 10**5000, "when": datetime(2026, 1, 1, tzinfo=UTC)})  # fmt: skip
    text = capsys.readouterr().out
    assert text.isascii() and text.count("\n") == 1
    data = _strict_json(text)
    assert data["s"] == "\ud800\x1b\u202e" and data["n"] == "nan" and data["1"] == "b'x'"
    assert data["t"] == [1, 2] and data["when"] == "2026-01-01 00:00:00+00:00"


def test_json_text_is_depth_limited_and_bounded() -> None:
    from agentmesh.cli.common import json_text

    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    text = json_text({"d": deep, "s": "y" * 10_000, "l": list(range(1000))}, max_depth=5)
    assert "[…]" in text and "… 800 more" in text and len(text) < 10_000
    assert json_text([]) == "[]" and json_text({}) == "{}" and json_text("a") == '"a"'


def test_to_entry_never_raises() -> None:
    for fields in HOSTILE.values():
        e = to_entry(b"1700000000000-0", fields, 1700000000.0)
        assert isinstance(e.event_type, str) and isinstance(e.session_id, str)
        assert e.raw == fields.get(b"envelope", b"")
    deep = to_entry(b"1-0", HOSTILE["deep_nesting"], 0)
    assert deep.envelope_error == f"nested deeper than {MAX_DEPTH} levels: not decoded"
    assert to_entry(b"1-0", HOSTILE["session_id_is_dict"], 0).session_id == '{"$ne":1}'
    assert to_entry(b"1-0", HOSTILE["envelope_is_list"], 0).session_id == "?"


def _event(n: int, **over: Any) -> ReplayedEvent:
    data: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "session_id": "[/]\x1b]8;;http://evil\x07",
        "type": "job.created", "source": "external", "payload": {"n": n},
    }  # fmt: skip
    data.update(over)
    return ReplayedEvent(Envelope.model_validate(data), partition=0, offset=n)


def test_a_replayed_timeline_renders_hostile_values() -> None:
    events = [
        _event(1),
        _event(2, source="\x1b[31mworker\r", type="[link=http://x]click[/link]\u202e",
               payload={"[bold]": "\x1b[2J\ud800", "text": "x" * MB, "osc": _OSC}),
        _event(3, source="[/]", type=ACTION, payload={
            "input_type": "\x1b[31m[/]", "emitted": [{"id": 1}, "\u202e", 7, None],
            "result": {"r": "\r\x9b"}}),
        _event(4, type=ACTION, payload={"emitted": "not-a-list", "input_type": None}),
    ]  # fmt: skip
    rep = Replay(session_id="[/]\x1b[31m\u202e", topic="[bold]audit\x1b", events=events,
                 records_read=4, spans=[(0, 0, -1)], unpublished=1,
                 stopped_at="\x1b[2J[/]")  # fmt: skip
    buf = io.StringIO()
    render(rep, Console(file=buf, width=160, force_terminal=False, color_system=None))
    text = buf.getvalue()
    assert STEERING.search(text) is None, repr(text[:2000])
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    assert "[/]" in text and "\\x1b" in text and "\\u202e" in text and "4 events" in text
    assert len(text) < 20_000
