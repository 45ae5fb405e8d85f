"""`mesh status`: the mesh at a glance, read from Redis and Postgres (no agent is asked).

Streams are found with SCAN TYPE stream. The mesh's own are shown: those with a consumer
group, and those its event types are registered on (a stream nobody consumes yet is worth
seeing); `--all-streams` shows every stream in the database. Per group: lag and pending;
per consumer: pending and idle time. Breaker states come from the short-lived reports each
agent replica writes (agents/runner.py); the relay backlog from the outbox.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


async def collect(
    redis_url: str, dlq_stream: str, *, known: set[str] | None = None
) -> dict[str, Any]:
    """`known`: the streams of the registered event types; None lists every stream."""
    from redis.asyncio import Redis
    from redis.exceptions import ResponseError

    from agentmesh.agents.runner import BREAKER_REPORT_PREFIX
    from agentmesh.audit_cli import _relay_status

    redis = Redis.from_url(redis_url)
    try:
        found = {_s(k) async for k in redis.scan_iter(_type="stream", count=500)}
        streams = sorted(found | (known or set()))
        rows: list[dict[str, Any]] = []
        for stream in streams:
            if stream == dlq_stream:
                continue
            length = int(await redis.xlen(stream))
            try:
                groups = await redis.xinfo_groups(stream)
            except ResponseError:
                groups = []
            if known is not None and not groups and stream not in known:
                continue  # not the mesh's: another application's stream in the same database
            if not groups:
                rows.append({"stream": stream, "length": length, "group": None})
            for g in groups:
                name = _s(g["name"])
                consumers = await redis.xinfo_consumers(stream, name)
                lag = g.get("lag")
                rows.append(
                    {
                        "stream": stream,
                        "length": length,
                        "group": name,
                        "lag": int(lag) if lag is not None else None,
                        "pending": int(g["pending"]),
                        "consumers": [
                            {
                                "name": _s(c["name"]),
                                "pending": int(c["pending"]),
                                "idle_ms": int(c["idle"]),
                            }
                            for c in consumers
                        ],
                    }
                )
        breakers: list[dict[str, Any]] = []
        async for key in redis.scan_iter(match=f"{BREAKER_REPORT_PREFIX}*", count=500):
            raw = await redis.get(key)
            if raw:
                report = json.loads(raw)
                for dep, b in sorted(report["states"].items()):
                    breakers.append(
                        {
                            "agent": report["agent"],
                            "replica": report["replica"],
                            "dependency": dep,
                            "state": b["state"],
                            "opened": b["opened"],
                            "last_opened_at": b["last_opened_at"],
                        }
                    )
        dlq_depth = int(await redis.xlen(dlq_stream))
    finally:
        await redis.aclose()
    relay = await _relay_status()
    return {
        "streams": rows,
        "dlq": {"stream": dlq_stream, "depth": dlq_depth},
        "breakers": sorted(breakers, key=lambda b: (b["agent"], b["dependency"], b["replica"])),
        "relay": relay,
    }


def _idle(ms: int) -> str:
    return f"{ms / 1000:.1f}s" if ms < 120_000 else f"{ms / 60_000:.0f}m"


def status(
    all_streams: Annotated[
        bool, typer.Option("--all-streams", help="Every stream in the database, not the mesh's.")
    ] = False,
    module: Annotated[
        str | None,
        typer.Option("--module", "-m", help="Module defining the agents (MESH_AGENTS_MODULE)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Streams and groups (length, lag, pending, consumers), DLQ depth, breakers, relay backlog."""
    from agentmesh.cli import emit_json, load_agents, out, run, settings
    from agentmesh.schemas import registry

    s = settings()
    known: set[str] | None = None
    if not all_streams:
        load_agents(module)
        known = {t.stream for t in registry.types() if t.stream}
    data = run(collect(s.redis_url, s.dlq_stream, known=known))
    if as_json:
        emit_json(data)
        return
    table = Table("stream", "length", "group", "lag", "pending", "consumers (pending, idle)")
    for r in data["streams"]:
        consumers = ", ".join(
            f"{c['name']} ({c['pending']}, {_idle(c['idle_ms'])})" for c in r.get("consumers", [])
        )
        lag = r.get("lag")
        table.add_row(
            r["stream"],
            str(r["length"]),
            r["group"] or "-",
            "?" if lag is None and r["group"] else str(lag if lag is not None else "-"),
            str(r.get("pending", "-")),
            consumers or "-",
        )
    out.print(table)
    dlq = data["dlq"]
    colour = "red" if dlq["depth"] else "green"
    out.print(f"DLQ {dlq['stream']}: [{colour}]{dlq['depth']}[/] message(s)")
    if data["breakers"]:
        bt = Table("agent", "dependency", "replica", "breaker", "opened")
        now = time.time()
        for b in data["breakers"]:
            state = {"closed": "[green]closed[/]", "open": "[red]open[/]"}.get(
                b["state"], f"[yellow]{b['state']}[/]"
            )
            opened = "never"
            if b["opened"]:
                opened = (
                    f"{b['opened']}x, last {_idle(int((now - b['last_opened_at']) * 1000))} ago"
                )
            bt.add_row(b["agent"], b["dependency"], b["replica"], state, opened)
        out.print(bt)
    else:
        out.print("breakers: none reported (no running agent has a dependency)")
    relay = data["relay"]
    out.print(
        f"relay: backlog {relay['backlog_rows']} rows (oldest {relay['backlog_oldest_s']:.1f} s), "
        f"{relay['slots_owned']}/{relay['slots']} partitions owned by "
        f"{len(relay['relays'])} relay(s)",
        highlight=False,
    )
