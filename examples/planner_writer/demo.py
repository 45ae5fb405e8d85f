"""`mesh demo`: the main job a newcomer runs first.

It brings up the local stack, starts the two example agents and the outbox relay as separate
processes, publishes a few tasks, waits for them to flow planner -> writer, shows each
session's handoffs as Postgres recorded them, then replays one session from the Kafka audit
log. Then it stops everything it started (unless `--keep`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import planner_writer.agents  # noqa: F401  (registers the example agents' event types)
from agentmesh import Mesh, Settings, devstack
from agentmesh.cli.timeline import render
from agentmesh.outbox.migrate import migrate

GOALS = [
    "explain consumer groups to a new teammate",
    "summarise yesterday's incident for the on-call channel",
    "draft release notes for agentmesh 0.1",
    "compare outbox relays: polling vs logical decoding",
    "write a runbook for draining the DLQ",
]


@dataclass
class DemoResult:
    sessions: list[str]
    completed: int
    elapsed_s: float


class MeshProc:
    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentmesh", *argv],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def run_demo(
    s: Settings, cfg: devstack.StackConfig, *, tasks: int, keep: bool, console: Console
) -> DemoResult:
    started = time.monotonic()
    with console.status("starting Redis, PostgreSQL and the Kafka-compatible broker…"):
        devstack.up(cfg)
        asyncio.run(migrate(s))
    console.print(f"[green]✓[/] local stack up in {cfg.root}")
    env = {
        **os.environ,
        "MESH_REDIS_URL": s.redis_url,
        "MESH_POSTGRES_DSN": s.postgres_dsn,
        "MESH_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "MESH_AUDIT_TOPIC": s.audit_topic,
        "MESH_AGENTS_MODULE": "planner_writer",
        "MESH_HTTP_PORT": "0",
        "MESH_LOG_FORMAT": "json",
    }
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    procs = [
        MeshProc(["agent", "run", n], env, cfg.logs_dir / f"agent-{n}.log")
        for n in ("planner", "writer")
    ]
    procs.append(MeshProc(["relay", "run"], env, cfg.logs_dir / "relay.log"))
    console.print(
        "[green]✓[/] started agents planner and writer and the outbox relay as separate "
        f"processes (logs in {cfg.logs_dir})"
    )
    try:
        sessions, completed = asyncio.run(_publish_and_follow(s, tasks, console))
        asyncio.run(_show(s, sessions, console))
        if completed:
            asyncio.run(replay_one(s, sessions[0], console))
    finally:
        for p in procs:
            p.stop()
        if not keep:
            devstack.down(cfg)
            console.print("[green]✓[/] agents and local stack stopped (data kept in the data dir)")
        else:
            console.print("[green]✓[/] agents stopped; local stack left running (--keep)")
    return DemoResult(sessions, completed, time.monotonic() - started)


async def _publish_and_follow(s: Settings, tasks: int, console: Console) -> tuple[list[str], int]:
    async with Mesh(s, operator="demo") as mesh:
        stamp = secrets.token_hex(2)
        sessions = []
        for i in range(tasks):
            goal = {"goal": GOALS[i % len(GOALS)]}
            session = f"demo-{stamp}-{i + 1}"
            sent = await mesh.publish("task.submitted", goal, session_id=session, source="demo")
            sessions.append(sent.session_id)
        console.print(f"[green]✓[/] published {tasks} task.submitted events onto mesh:tasks")
        pool = await mesh.pg()
        done = 0
        with Progress(
            TextColumn("waiting for drafts"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            job = bar.add_task("drafts", total=tasks)
            deadline = time.monotonic() + 60
            while done < tasks and time.monotonic() < deadline:
                done = await pool.fetchval(
                    "SELECT count(*) FROM mesh_actions "
                    "WHERE agent = 'writer' AND session_id = ANY($1)",
                    sessions,
                )
                bar.update(job, completed=done)
                await asyncio.sleep(0.1)
        if done < tasks:
            console.print(f"[red]✗[/] only {done}/{tasks} sessions finished within 60 s")
        else:
            console.print(f"[green]✓[/] all {tasks} sessions went planner → writer")
        return sessions, int(done)


async def _show(s: Settings, sessions: list[str], console: Console) -> None:
    """What Postgres recorded: one row per agent action, with what it handed off."""
    async with Mesh(s) as mesh:
        rows = await (await mesh.pg()).fetch(
            """SELECT a.session_id, a.created_at, a.agent, a.input_type, a.result,
                      coalesce(string_agg(o.type, ', ' ORDER BY o.id)
                               FILTER (WHERE o.stream IS NOT NULL), '') AS handed_off
               FROM mesh_actions a
               LEFT JOIN mesh_outbox o
                      ON o.agent = a.agent AND o.idempotency_key = a.idempotency_key
               WHERE a.session_id = ANY($1)
               GROUP BY a.id ORDER BY a.session_id, a.id""",
            sessions,
        )
    table = Table(title="handoffs, as recorded in PostgreSQL (one row per agent action)")
    for col in ("session", "time", "agent", "consumed → handed off", "result"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            escape(r["session_id"]),
            r["created_at"].strftime("%H:%M:%S.%f")[:-3],
            r["agent"],
            f"{r['input_type']} → {r['handed_off'] or '—'}",
            escape(_short(r["result"], 16)),
        )
    console.print(table)


async def replay_one(s: Settings, session: str, console: Console) -> None:
    """Wait for the relay to publish the session, then replay it from Kafka, not Postgres."""
    async with Mesh(s) as mesh:
        await mesh.wait_published(session_id=session, timeout_s=30)
        rep = await mesh.replay(session)
    console.print()
    console.print("[bold]one session, replayed from the Kafka audit log[/] "
                  f"(the same as `mesh replay {session}`):")  # fmt: skip
    render(rep, console)


def _short(value: Any, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
