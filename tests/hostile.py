"""Hostile stream entries for the refund desk's input (`refund:tickets`), as a careless or
malicious producer could XADD them: each with the DLQ reason codes that say precisely what is
wrong with it. Built from a seed, so a failing run can be repeated."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: reasons that name a cause; a hostile entry dead-lettered for anything else was not pinned
GENERIC = {"max_deliveries", "handler_error", "nonretryable", "poison", "decode_error"}


@dataclass(frozen=True)
class Hostile:
    kind: str
    fields: dict[bytes, bytes]  # the stream entry as XADDed
    reasons: frozenset[str]  # the DLQ reason codes that describe it precisely


def _ticket(n: int) -> dict[str, Any]:
    return {"ticket_id": f"H-{n}", "customer": f"h{n}@example.com", "order_id": f"O-{n}",
            "amount_cents": 1500, "text": "hostile"}  # fmt: skip


def _envelope(n: int, payload: Any = None, **over: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "session_id": f"hostile-{n}", "type": "ticket.submitted",
        "source": "fuzz", "payload": _ticket(n) if payload is None else payload,
    }  # fmt: skip
    env.update(over)
    return {k: v for k, v in env.items() if v is not _DROP}


_DROP = object()


def _raw(env: Any) -> dict[bytes, bytes]:
    return {b"envelope": json.dumps(env).encode()}


def _kinds(n: int, rnd: random.Random) -> Iterator[tuple[str, dict[bytes, bytes], set[str]]]:
    """Every kind once for entry n; the caller samples."""
    depth = rnd.choice((200, 1_000, 5_000))
    nested = "[" * depth + "]" * depth
    deep = json.dumps(_envelope(n))[:-1] + f', "deep": {nested}}}'
    yield "deep_nesting", {b"envelope": deep.encode()}, {"too_deep"}
    bad_utf8 = json.dumps(_envelope(n)).encode().replace(b"hostile", b"host\xff\xfeile", 1)
    yield "invalid_utf8", {b"envelope": bad_utf8}, {"malformed_json", "invalid_encoding"}
    surrogate = json.dumps(_envelope(n)).replace("hostile", "host\\ud800ile", 1)
    yield (
        "lone_surrogate_escape",
        {b"envelope": surrogate.encode()},
        {"malformed_json", "invalid_encoding", "malformed_envelope", "schema_violation"},
    )
    raw_surrogate = json.dumps(_envelope(n)).encode().replace(b"hostile", b"\xed\xa0\x80", 1)
    yield (
        "lone_surrogate_bytes",
        {b"envelope": raw_surrogate},
        {"malformed_json", "invalid_encoding"},
    )
    t = _ticket(n) | {"amount_cents": "[bold]12[/] euros"}
    yield "markup_wrong_type", _raw(_envelope(n, t)), {"schema_violation"}
    t = _ticket(n) | {"text": "\x1b[31m" + "x" * 6_000}
    yield "long_text", _raw(_envelope(n, t)), {"schema_violation"}
    t = {k: v for k, v in _ticket(n).items() if k != "order_id"}
    yield "missing_field", _raw(_envelope(n, t)), {"schema_violation"}
    yield "payload_not_object", _raw(_envelope(n, [1, 2, 3])), {"malformed_envelope"}
    yield "no_event_id", _raw(_envelope(n, event_id=_DROP)), {"malformed_envelope"}
    yield "no_session", _raw(_envelope(n, session_id=_DROP)), {"malformed_envelope"}
    yield (
        "bad_event_id",
        _raw(_envelope(n, event_id="[link=http://x]x[/link]")),
        {"malformed_envelope"},
    )
    yield "bad_created_at", _raw(_envelope(n, created_at="yesterday")), {"malformed_envelope"}
    yield "future_version", _raw(_envelope(n, schema_version=99)), {"unsupported_schema_version"}
    yield "unknown_type", _raw(_envelope(n, type="ticket.forged")), {"unknown_type", "no_handler"}
    yield "session_is_dict", _raw(_envelope(n, session_id={"$ne": 1})), {"malformed_envelope"}
    yield "envelope_is_list", _raw([_envelope(n)]), {"malformed_envelope"}
    yield (
        "not_json",
        {b"envelope": rnd.choice((b"hello", b"{", b"\x00\x00", b"", b"nan"))},
        {"malformed_json", "malformed_envelope"},
    )
    yield "no_envelope_field", {b"payload": b"{}"}, {"malformed_json", "malformed_envelope"}


def hostile_entries(count: int, seed: int = 11) -> list[Hostile]:
    """`count` entries, the kinds in turn (so every kind is there), plus two oversize ones."""
    rnd = random.Random(seed)
    out: list[Hostile] = []
    n = 0
    while len(out) < count:
        for kind, fields, reasons in _kinds(n, rnd):
            out.append(Hostile(kind, fields, frozenset(reasons)))
            n += 1
    out = out[:count]
    for i in range(2):
        t = _ticket(10_000 + i) | {"text": "y" * 300_000}
        out.append(Hostile("oversize", _raw(_envelope(10_000 + i, t)), frozenset({"oversize"})))
    rnd.shuffle(out)
    return out
