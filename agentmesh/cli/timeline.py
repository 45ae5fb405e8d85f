"""Rendering a replayed session for people: one row per event, what happened in plain words.

Everything in a row came from Kafka and may be anything a producer wrote: every value goes
through `safe()` (markup escaped, control characters shown as escapes)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from agentmesh.cli.common import safe
from agentmesh.outbox.replay import Replay
from agentmesh.schemas.audit import ACTION


def summary(
    event_type: str, payload: Any, limit: int = 90, types: dict[str, str] | None = None
) -> str:
    """A one-line gist of a payload: `mesh.action` in words (emitted event ids shown as their
    types when `types` knows them), other payloads as key=value."""
    if not isinstance(payload, dict):
        return _cut(json.dumps(payload, default=str), limit)
    if event_type == ACTION:
        names = types or {}
        ids = payload.get("emitted")
        shown = [names.get(i, i) if isinstance(i, str) else _compact(i)
                 for i in (ids if isinstance(ids, list) else [])]  # fmt: skip
        emitted = ", ".join(shown) or "nothing"
        result = payload.get("result")
        text = f"handled {payload.get('input_type')} → emitted {emitted}"
        if result not in (None, {}, []):
            text += f"; result {_compact(result)}"
        return _cut(text, limit)
    return _cut(", ".join(f"{k}={_compact(v)}" for k, v in payload.items()), limit)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return repr(_cut(value, 40))
    if isinstance(value, list):
        return f"[{len(value)} items]" if len(value) > 3 else json.dumps(value, default=str)
    return json.dumps(value, default=str, separators=(",", ":"))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(rep: Replay, console: Console) -> None:
    ranges = [f"{a}..{b if b >= 0 else 'end'}" for _, a, b in rep.spans]
    parts = sorted({p for p, _, _ in rep.spans})
    more = f" and {len(ranges) - 3} more ranges" if len(ranges) > 3 else ""
    shown = ", ".join(ranges[:3]) + more
    where = safe(f"{rep.topic}[{', '.join(map(str, parts))}] offsets {shown}")
    how = "seeked with the relay's offset index" if rep.used_index else "scanned the partition"
    console.print(
        f"[bold]session {safe(rep.session_id, 200)}[/]: {len(rep.events)} events from Kafka "
        f"({where}; {how}; {rep.records_read} records read in {rep.elapsed_s:.2f} s"
        + (f"; {rep.duplicates} duplicate copies dropped" if rep.duplicates else "")
        + ")",
        highlight=False,
    )
    table = Table("#", "time (UTC)", "+s", "agent", "event", "what happened", box=None)
    t0 = rep.events[0].envelope.created_at if rep.events else None
    types = {e.envelope.event_id: e.envelope.type for e in rep.events}
    for i, e in enumerate(rep.events, 1):
        env = e.envelope
        since = (env.created_at - t0).total_seconds() if t0 else 0.0
        table.add_row(
            str(i),
            env.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            f"{since:.3f}",
            safe(env.source, 60),
            safe(env.type, 60),
            safe(summary(env.type, env.payload, types=types)),
        )
    console.print(table)
    if rep.stopped_at:
        console.print(f"(stopped at event {safe(rep.stopped_at, 200)}, as --until asked)",
                      highlight=False)  # fmt: skip
    if rep.unpublished:
        console.print(
            f"[yellow]note:[/] {rep.unpublished} more events of this session are still in the "
            "outbox, not yet in Kafka (is a relay running? `mesh relay status`)",
            highlight=False,
        )
