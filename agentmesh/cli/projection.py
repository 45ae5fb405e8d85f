"""`mesh projection run|rebuild|status|query`: read models folded from the Kafka audit log,
rendered from `Mesh.projections` (agentmesh/client/projections.py)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from agentmesh.cli.common import (
    EXIT_INPUT,
    JsonOpt,
    ModuleOpt,
    emit_json,
    fail,
    load_agents,
    out,
    progress_bar,
    run,
    safe,
    settings,
)
from agentmesh.client import Mesh
from agentmesh.client.projections import QueryResult
from agentmesh.outbox.projection import PROJECTIONS, Projection
from agentmesh.outbox.projection_apply import ProjectionError
from agentmesh.outbox.projection_rebuild import RebuildResult
from agentmesh.outbox.projection_serve import serve
from agentmesh.outbox.projection_status import ProjectionStatus
from agentmesh.outbox.snapshots import SESSIONS, session_snapshots
from agentmesh.process.logs import configure

projection_app = typer.Typer(
    help="Read models folded from the audit log (projections).", no_args_is_help=True
)
NameArg = Annotated[str, typer.Argument(help=f"Projection name ({SESSIONS}: session snapshots).")]


def resolve(name: str, module: str | None) -> Projection:
    """The projection NAME declared by the agents module (importing it declares them)."""
    agents = load_agents(module)
    if name == SESSIONS:
        return session_snapshots(settings(), agents.values())
    found = PROJECTIONS.get(name)
    if found is None:
        known = ", ".join(sorted([*PROJECTIONS, SESSIONS]))
        fail(f"no projection {name!r} is declared (known: {known})", EXIT_INPUT)
    return found


@projection_app.command("run")
def run_cmd(
    name: NameArg,
    module: ModuleOpt = None,
    http_port: Annotated[
        int | None, typer.Option(help="Port of /healthz /readyz /metrics.")
    ] = None,
) -> None:
    """Fold the audit log into the projection's table until SIGTERM/SIGINT. Run several:
    they share the topic's partitions."""
    p = resolve(name, module)
    s = settings() if http_port is None else settings(http_port=http_port)
    configure(fmt=s.log_format, level=s.log_level)

    try:
        run(serve(s, p))
    except ProjectionError as exc:
        fail(str(exc))


@projection_app.command("rebuild")
def rebuild_cmd(name: NameArg, module: ModuleOpt = None, as_json: JsonOpt = False) -> None:
    """Replay the whole audit log into a fresh table, then swap it in atomically."""
    p = resolve(name, module)

    async def go(progress: Any) -> RebuildResult:
        async with Mesh() as mesh:
            return await mesh.projections.rebuild(p, progress=progress)

    with progress_bar("folding the audit log", enabled=not as_json) as progress:
        try:
            res = run(go(progress))
        except ProjectionError as exc:
            fail(str(exc))
    if as_json:
        emit_json(asdict(res))
        return
    out.print(
        f"rebuilt {safe(res.name)}: generation {res.old_generation} → {res.generation}, "
        f"{res.folded} events folded from {res.records} records ({res.duplicates} duplicate "
        f"copies skipped, {res.skipped} refused) in {res.elapsed_s:.1f} s",
        highlight=False,
    )


@projection_app.command("status")
def status_cmd(
    name: Annotated[str | None, typer.Argument(help="One projection (default: all).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per projection: generation, rows, runners, refused records; lag per partition."""

    async def go() -> list[ProjectionStatus]:
        async with Mesh() as mesh:
            return await mesh.projections.status(name)

    found = run(go())
    if as_json:
        emit_json([asdict(st) for st in found])
        return
    if not found:
        out.print("no projection has run here yet (mesh projection run NAME)")
    for st in found:
        lag = "?" if st.lag is None else str(st.lag)
        out.print(
            f"[bold]{safe(st.name)}[/] (topic {safe(st.topic)}, generation {st.generation}): "
            f"{st.rows if st.rows is not None else '?'} rows · {st.runners} runner(s) · "
            f"lag {lag} · {st.skipped} refused record(s)",
            highlight=False,
        )
        table = Table("partition", "next offset", "end", "lag", "runner (postgres pid)")
        for part in st.partitions:
            table.add_row(str(part.partition), str(part.next_offset),
                          "?" if part.end is None else str(part.end),
                          "?" if part.lag is None else str(part.lag),
                          str(part.runner_pid or "-"))  # fmt: skip
        out.print(table)


@projection_app.command("query")
def query_cmd(
    name: NameArg,
    query: Annotated[
        str | None, typer.Argument(help="One of its queries (default: the first).")
    ] = None,
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a query the projection declares against its live view."""
    p = resolve(name, module)

    async def go() -> QueryResult:
        async with Mesh() as mesh:
            return await mesh.projections.query(p, query)

    res = run(go())
    if as_json:
        emit_json(res.rows)
        return
    table = Table(*[safe(c) for c in res.columns], title=f"{safe(res.projection)}: {res.query}")
    for row in res.rows:
        table.add_row(*[safe(v) for v in row.values()])
    out.print(table)
