"""The `mesh_outbox` writer: the only module that knows the table's columns and INSERTs rows.

A batch of rows is a set of column arrays (`OutboxRows`), inserted with one `unnest` statement
whatever its size, so writing the outbox costs one round trip per batch.

Who writes rows (each in the transaction of what it records, or before it happens):

- the unit of work (outbox/unit_of_work.py), as one CTE of its single commit statement per
  batch (`committed_insert_sql`): for each input whose idempotency key that statement inserted,
  its `mesh.action` audit event and audit-only events (stream NULL) and its handoffs (stream
  set). A key committed before yields no rows. An event id already in the table fails the
  statement (a data error: the batch is then committed message by message).
- `publish_events` (outbox/publish.py): events entering the mesh from outside (`mesh publish`,
  the client, periodic jobs, the demos), before their XADD. An event id already in the table is
  skipped (`ON CONFLICT (event_id) DO NOTHING`), so publishing the same event again is harmless.
- `record_operator_action` (outbox/operator.py): one `mesh.operator` row per operator action,
  stream NULL, committed before the action is carried out.

The columns written here:

- event_id (uuid, unique): the envelope's; readers of the audit log dedup by it.
- session_id: the envelope's; the Kafka record key.
- type, causation_id, schema_version: the envelope's, copied so the relay makes the Kafka
  headers without parsing `envelope`.
- stream: the Redis stream a handoff goes to; NULL for a row bound for Kafka only.
- envelope: the wire JSON, sent as is to Kafka (and to Redis again by a redrive).
- agent: who wrote the row: the agent whose unit of work committed it, else the envelope's
  source (`external`, `operator:<name>`, ...); a Kafka header.
- idempotency_key: for the unit of work, the key of the input that produced the row (a
  redelivered input finds its stored handoffs by (agent, idempotency_key)); else the
  envelope's own key.
- session_hash: `kafka.session_hash(session_id)`, what Kafka's default partitioner computes
  for the key; relays select the rows of their partitions by `session_hash % partitions`.

The other columns are not written here: `id` (bigserial, the relay's order), `created_at`
(now()), and `published_at`, `kafka_topic`, `kafka_partition`, `kafka_offset` (the relay's).

Who reads and marks rows:

- the relay (outbox/relay.py) selects unpublished rows of the partitions it owns in id order,
  sends them to Kafka and marks the acked ones published (published_at and the kafka_*
  columns). A statement-level trigger NOTIFYs `mesh_outbox` once per INSERT statement, which
  wakes it. Each record carries the row's `id` as the header `mesh-seq`: replay orders a
  session by it. When the broker hands out an offset it had already acked, the relay marks
  the rows published at or after it in that partition unpublished again (outbox/relay_heal.py),
  so they are sent again; their kafka_* columns keep the lost place until then.
- `UnitOfWork.stored_handoffs` reads a committed input's handoff rows (stream NOT NULL) to
  re-send them on a redelivery instead of running the handler again.
- outbox/resend.py: `republish` marks published rows unpublished again (the relay sends them
  again), `redrive` XADDs handoff rows onto their streams again.
- status, replay and the demos count the backlog (`published_at IS NULL`).

Pruning: the relay deletes published rows older than `MESH_OUTBOX_RETENTION_S` (`Relay.prune`,
one relay at a time, every `MESH_OUTBOX_PRUNE_INTERVAL_S`; a retention of 0 keeps them all).
Unpublished rows are never pruned.
"""

from __future__ import annotations

import functools
from typing import Any

import asyncpg

from agentmesh.outbox import kafka
from agentmesh.schemas.envelope import Envelope

#: The columns every writer fills, in the order of their parameters.
COLUMNS = (
    "event_id",
    "session_id",
    "type",
    "stream",
    "envelope",
    "agent",
    "idempotency_key",
    "causation_id",
    "schema_version",
    "session_hash",
)
_PG_TYPE = {"event_id": "uuid", "schema_version": "int", "session_hash": "int"}  # else text
_COLUMN_LIST = ", ".join(COLUMNS)

#: `kafka.session_hash` (murmur2 in pure Python, ~2 us) remembered per session: an agent writes
#: several rows per input, and a session's inputs keep coming back to the same process.
session_hash = functools.lru_cache(maxsize=1 << 14)(kafka.session_hash)


def _unnest(columns: tuple[str, ...], first: int) -> str:
    """unnest($first::uuid[], ...): one array parameter per column, from parameter `first` on."""
    arrays = ", ".join(f"${first + i}::{_PG_TYPE.get(c, 'text')}[]" for i, c in enumerate(columns))
    return f"unnest({arrays})"


#: Rows with an agent each (`OutboxRows()`), parameters $1..$10.
INSERT_SQL = f"INSERT INTO mesh_outbox ({_COLUMN_LIST})\nSELECT * FROM {_unnest(COLUMNS, 1)}\n"

#: The same, skipping rows whose event id is already in the table.
INSERT_NEW_SQL = INSERT_SQL + "ON CONFLICT (event_id) DO NOTHING\n"

_ROW_COLUMNS_ONE_AGENT = tuple(c for c in COLUMNS if c != "agent")


def committed_insert_sql(*, agent: str, first: int, committed: str) -> str:
    """The INSERT of the unit of work's commit statement, as the body of a CTE.

    Rows of one agent (`OutboxRows(agent=...)`), whose name is the SQL parameter `agent`
    (e.g. "$1"); its column arrays are parameters `first`.. (nine of them). Only the rows whose
    idempotency_key is in the CTE `committed` (the keys this statement inserted) are written,
    in the order they were added. Returns their ids."""
    select = ", ".join(agent if c == "agent" else f"o.{c}" for c in COLUMNS)
    return (
        f"INSERT INTO mesh_outbox ({_COLUMN_LIST})\n"
        f"    SELECT {select}\n"
        f"    FROM {_unnest(_ROW_COLUMNS_ONE_AGENT, first)}\n"
        f"         WITH ORDINALITY AS o({', '.join(_ROW_COLUMNS_ONE_AGENT)}, ord)\n"
        f"    JOIN {committed} USING (idempotency_key)\n"
        f"    ORDER BY o.ord\n"
        f"    RETURNING id"
    )


class OutboxRows:
    """A batch of outbox rows as column arrays (one list per column: what `unnest` takes).

    `OutboxRows()`: each row's agent is its envelope's source (publish, operator actions);
    `params()` gives the ten arrays of `INSERT_SQL`. `OutboxRows(agent=name)`: every row is
    that agent's (the unit of work), so the agent is not repeated per row; `params()` gives
    the nine arrays of `committed_insert_sql` and the agent goes in as one parameter.
    """

    __slots__ = (
        "agent",
        "agents",
        "causation_id",
        "envelope",
        "event_id",
        "idempotency_key",
        "schema_version",
        "session_hash",
        "session_id",
        "stream",
        "type",
    )

    def __init__(self, *, agent: str | None = None) -> None:
        self.agent = agent
        self.event_id: list[str] = []
        self.session_id: list[str] = []
        self.type: list[str] = []
        self.stream: list[str | None] = []
        self.envelope: list[str] = []
        self.agents: list[str] = []  # only without a batch-wide agent
        self.idempotency_key: list[str] = []
        self.causation_id: list[str | None] = []
        self.schema_version: list[int] = []
        self.session_hash: list[int] = []

    def __len__(self) -> int:
        return len(self.event_id)

    def add(self, stream: str | None, env: Envelope, idempotency_key: str | None = None) -> None:
        """One row: `env`, bound for `stream` (None: Kafka only). `idempotency_key`: the
        input's key that produced it (the unit of work); by default the envelope's own."""
        self.event_id.append(env.event_id)
        self.session_id.append(env.session_id)
        self.type.append(env.type)
        self.stream.append(stream)
        self.envelope.append(env.to_json())
        if self.agent is None:
            self.agents.append(env.source)
        self.idempotency_key.append(
            env.idempotency_key if idempotency_key is None else idempotency_key
        )
        self.causation_id.append(env.causation_id)
        self.schema_version.append(env.schema_version)
        self.session_hash.append(session_hash(env.session_id))

    def params(self) -> list[list[Any]]:
        """The column arrays, in the parameter order of the matching statement (`COLUMNS`)."""
        columns = COLUMNS if self.agent is None else _ROW_COLUMNS_ONE_AGENT
        return [self.agents if c == "agent" else getattr(self, c) for c in columns]


async def insert(
    conn: asyncpg.Connection | asyncpg.Pool, rows: OutboxRows, *, skip_existing: bool
) -> None:
    """Write `rows` (each with its own agent) in one statement. `skip_existing`: an event id
    already in the table is left as it is; otherwise it fails the statement."""
    if rows.agent is not None:
        raise ValueError("rows of one agent are written by the unit of work's statement")
    await conn.execute(INSERT_NEW_SQL if skip_existing else INSERT_SQL, *rows.params())
