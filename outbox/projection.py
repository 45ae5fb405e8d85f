"""Declaring a read model folded from the audit log: a name, its table, a fold function.

    desk = Projection(
        "refund_desk",
        table="CREATE TABLE {table} (session_id text PRIMARY KEY, outcome text)",
        types=["ticket.closed"],
        queries={"outcomes": "SELECT outcome, count(*) AS n FROM {table} GROUP BY 1"},
    )

    @desk.fold
    async def closed(event: ReplayedEvent, tx: ProjectionTx) -> None:
        await tx.conn.execute(
            f"INSERT INTO {tx.table} VALUES ($1, $2) ON CONFLICT (session_id) DO UPDATE "
            "SET outcome = excluded.outcome",
            event.envelope.session_id, event.envelope.payload["outcome"])

`mesh projection run refund_desk` folds every audit event (of `types`, if given) through the
fold function, inside the transaction that also stores the Kafka offsets, so each event is
applied once. `{table}` in the DDL, the fold's `tx.table` and the queries name the table of the
generation being written (`<name>_g<N>`); readers use the view `<name>`, which a rebuild swaps
to a fresh generation in one transaction. The fold must only change its own table.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from agentmesh.outbox.replay import ReplayedEvent

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass(frozen=True)
class ProjectionTx:
    """What a fold gets besides the event: the connection, inside the batch's transaction,
    and the (unquoted, validated) name of the table it writes."""

    conn: asyncpg.Connection
    table: str
    generation: int


Fold = Callable[[ReplayedEvent, ProjectionTx], Awaitable[None]]
AfterCommit = Callable[[asyncpg.Pool, str, Sequence[int]], Awaitable[None]]
"""Called after batches committed: (pool, the table written, the partitions this runner
folds); for work that must not be inside the batch's transaction (session snapshots)."""

PROJECTIONS: dict[str, Projection] = {}
"""Every projection declared in this process, by name (what `mesh projection run` looks up)."""


class Projection:
    """A read model: `table` is the DDL (one or more statements, `{table}` for the table's
    name), `types` the event types it folds (None: all), `queries` named SELECTs that
    `mesh projection query NAME [QUERY]` runs against the live view, `after_commit` work to do
    after batches committed (outside the exactly-once rule: it may run again after a crash)."""

    def __init__(
        self,
        name: str,
        *,
        table: str,
        types: Iterable[str] | None = None,
        queries: Mapping[str, str] | None = None,
        after_commit: AfterCommit | None = None,
        register: bool = True,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"projection name {name!r}: lower-case letters, digits and _ only")
        if "{table}" not in table:
            raise ValueError(f"projection {name}: the table DDL must name its table as {{table}}")
        self.name = name
        self.ddl = table
        self.types = None if types is None else frozenset(types)
        self.queries = dict(queries or {})
        self.after_commit = after_commit
        self._fold: Fold | None = None
        if register:
            PROJECTIONS[name] = self

    def fold(self, fn: Fold) -> Fold:
        """Register the fold function: `async fn(event, tx)`; it runs once per event id."""
        self._fold = fn
        return fn

    def wants(self, event_type: str) -> bool:
        return self.types is None or event_type in self.types

    async def apply(self, event: ReplayedEvent, tx: ProjectionTx) -> None:
        if self._fold is None:
            raise RuntimeError(f"projection {self.name} has no @fold function")
        await self._fold(event, tx)

    def table_of(self, generation: int) -> str:
        return f"{self.name}_g{generation}"

    def query_sql(self, query: str | None) -> tuple[str, str]:
        """(query name, SQL against the live view). Raises KeyError for an unknown name."""
        if not self.queries:
            raise KeyError(f"projection {self.name} declares no queries")
        key = query or next(iter(self.queries))
        return key, self.queries[key].replace("{table}", self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "types": sorted(self.types or []), "queries": list(self.queries)}
