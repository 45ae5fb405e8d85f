"""Read models for operators: `mesh.projections.status()`, `.query()`, `.rebuild()`,
`.catch_up()`; and a session's state from its snapshot (`Mesh.replay_state`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from agentmesh.client.errors import InvalidRequest, NotFound
from agentmesh.outbox.projection import Projection
from agentmesh.outbox.projection_rebuild import RebuildResult, catch_up, rebuild
from agentmesh.outbox.projection_runner import FoldResult
from agentmesh.outbox.projection_status import ProjectionStatus, status
from agentmesh.outbox.snapshots import SESSIONS, forget

if TYPE_CHECKING:
    from agentmesh.client.mesh import Mesh

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class QueryResult:
    projection: str
    query: str
    columns: list[str]
    rows: list[dict[str, Any]]


class Projections:
    """The projections of one mesh's database (see agentmesh.outbox.projection)."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def status(self, name: str | None = None) -> list[ProjectionStatus]:
        """Per projection: generation, rows, runners, skipped records, lag per partition."""
        found = await status(self._mesh.settings, await self._mesh.pg(), name)
        if name is not None and not found:
            raise NotFound(f"projection {name!r} has never run here (mesh projection run {name})")
        return found

    async def query(self, p: Projection, query: str | None = None) -> QueryResult:
        """Run one of the projection's declared queries against its live view."""
        try:
            key, sql = p.query_sql(query)
        except KeyError:
            known = ", ".join(p.queries) or "none"
            raise InvalidRequest(f"projection {p.name} has no query {query!r} "
                                 f"(it declares: {known})") from None  # fmt: skip
        try:
            rows = await (await self._mesh.pg()).fetch(sql)
        except asyncpg.UndefinedTableError:
            raise NotFound(f"projection {p.name} has no table yet: run "
                           f"`mesh projection run {p.name}`") from None  # fmt: skip
        columns = list(rows[0].keys()) if rows else []
        return QueryResult(p.name, key, columns, [dict(r) for r in rows])

    async def rebuild(self, p: Projection, *, progress: Progress | None = None) -> RebuildResult:
        """Fold the whole audit log into a fresh table and swap it in atomically. Rebuilding
        mesh_sessions also forgets the stored session snapshots."""
        if p.name == SESSIONS:
            async with (await self._mesh.pg()).acquire() as conn:
                await forget(conn, self._mesh.settings.audit_topic)
        return await rebuild(self._mesh.settings, p, progress=progress)

    async def catch_up(self, p: Projection, *, progress: Progress | None = None) -> FoldResult:
        """Fold the live table up to the log's current end, in this process."""
        return await catch_up(self._mesh.settings, p, progress=progress)
