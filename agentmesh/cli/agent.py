"""`mesh agent run|list` and `mesh publish`: run an agent type as this process; put an event
into the mesh (over `Mesh.publish` and `Mesh.follow`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from agentmesh.agents.runner import Runner
from agentmesh.cli.common import (
    EXIT_BACKPRESSURE,
    EXIT_FAILED,
    EXIT_INPUT,
    JsonOpt,
    ModuleOpt,
    emit_json,
    err,
    fail,
    load_agents,
    out,
    read_json_arg,
    run,
    safe,
    settings,
)
from agentmesh.client import Backpressure, Mesh, Published, SessionState
from agentmesh.process.logs import configure

agent_app = typer.Typer(help="Run and list agents.", no_args_is_help=True)


@agent_app.command("run")
def agent_run(
    name: str,
    module: ModuleOpt = None,
    http_port: Annotated[
        int | None, typer.Option(help="Port of /healthz /readyz /metrics.")
    ] = None,
    consumers: Annotated[int | None, typer.Option(help="Consumer loops in this process.")] = None,
) -> None:
    """Run one agent type as this process, until SIGTERM/SIGINT."""
    agents = load_agents(module)
    if name not in agents:
        fail(f"no agent named {name!r}; known: {', '.join(sorted(agents)) or 'none'}", EXIT_INPUT)
    overrides: dict[str, Any] = {}
    if http_port is not None:
        overrides["http_port"] = http_port
    if consumers is not None:
        overrides["consumers"] = consumers
    s = settings(**overrides)
    configure(fmt=s.log_format, level=s.log_level)
    run(Runner(agents[name], s).run_forever())


@agent_app.command("list")
def agent_list(module: ModuleOpt = None, as_json: JsonOpt = False) -> None:
    """List the agents a module defines: what each consumes and emits."""
    rows = [a.describe() for a in load_agents(module).values()]
    if as_json:
        emit_json(rows)
        return
    table = Table("agent", "consumes (type → stream)", "emits", "dependencies")
    for r in rows:  # from the agents module, not the wire; safe() all the same ("[" in a name)
        consumes = "\n".join(f"{safe(t)} → {safe(s)}" for t, s in r["consumes"].items())
        table.add_row(safe(r["name"]), consumes, safe(", ".join(r["emits"])),
                      safe(", ".join(r["dependencies"])))  # fmt: skip
    out.print(table)


def publish(
    stream: Annotated[str, typer.Argument(help="Target stream (must be the type's stream).")],
    event_type: Annotated[str, typer.Option("--type", "-t", help="Event type.")],
    session: Annotated[
        str | None, typer.Option("--session", "-s", help="Session id (new if omitted).")
    ] = None,
    payload: Annotated[
        str, typer.Option("--payload", "-p", help="JSON, @file or - for stdin.")
    ] = "{}",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Dedup key (default: the event id).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the session until it ends or waits on a human.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 120.0,
    backlog_wait: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds to wait for room when STREAM's backlog is over MESH_PUBLISH_MAX_BACKLOG "
            "(default MESH_PUBLISH_BACKLOG_WAIT_S); then exit 4, nothing published.",
        ),
    ] = None,
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a payload against its event schema, then XADD it onto STREAM (exit 4 when the
    stream's backlog is over its bound: nothing is published)."""
    load_agents(module)
    data = read_json_arg(payload)
    if not isinstance(data, dict):
        fail("payload must be a JSON object", EXIT_INPUT)

    async def go() -> tuple[Published, SessionState | None]:
        async with Mesh() as mesh:
            sent = await mesh.publish(event_type, data, session_id=session,
                                      idempotency_key=idempotency_key, stream=stream,
                                      backlog_wait_s=backlog_wait)  # fmt: skip
            if not as_json:
                out.print(f"published {safe(event_type)} {safe(sent.event_id)} to "
                          f"{safe(stream)} (session {safe(sent.session_id)})")  # fmt: skip
            if not wait:
                return sent, None
            with err.status(f"following session {safe(sent.session_id)}") as bar:

                def shown(st: SessionState) -> None:
                    if not as_json:
                        bar.update(f"session {safe(st.session_id)}: {safe(st.status)} · "
                                   f"{safe(st.step, 200)}")  # fmt: skip

                return sent, await mesh.follow(sent.session_id, timeout_s=timeout, on_update=shown)

    try:
        sent, state = run(go())
    except Backpressure as exc:
        fail(str(exc), EXIT_BACKPRESSURE)
    result: dict[str, Any] = asdict(sent)
    if wait:
        result["session"] = asdict(state) if state else None
        if not as_json:
            step = state.step if state else "no agent acted"
            out.print(f"session {safe(sent.session_id)}: "
                      f"{safe(state.status) if state else 'timed out'} · "
                      f"{safe(step, 200)}")  # fmt: skip
    if as_json:
        emit_json(result)
    if wait and (state is None or state.status == "running"):
        fail(f"session {sent.session_id} did not end within {timeout:.0f} s", EXIT_FAILED)
