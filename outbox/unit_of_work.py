"""The Postgres unit of work: idempotency record + action record + outbox rows, atomically.

A whole batch commits in ONE statement (data-modifying CTEs), so a batch of 200 costs one
round trip and one fsync. The idempotency insert is `ON CONFLICT DO NOTHING`: a key some
other consumer already committed simply yields no row, and everything hanging off it (the
action, the outbox rows) is skipped in the same statement. If the batch statement fails, each
message is retried alone, so one bad message cannot hold back the other 199.

The outbox part of the statement (its columns, its INSERT) comes from outbox/outbox_rows.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from agentmesh.bus.entry import Outgoing
from agentmesh.outbox.outbox_rows import OutboxRows, committed_insert_sql
from agentmesh.schemas.envelope import Envelope

_COMMIT_SQL = f"""
WITH input AS (
    SELECT * FROM unnest($2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::int[])
        AS t(idempotency_key, input_event_id, session_id, input_type, stream, entry_id,
             result, emitted)
),
idem AS (
    INSERT INTO mesh_idempotency (agent, idempotency_key, input_event_id)
    SELECT $1, idempotency_key, input_event_id FROM input
    ON CONFLICT DO NOTHING
    RETURNING idempotency_key
),
act AS (
    INSERT INTO mesh_actions (agent, idempotency_key, session_id, input_event_id, input_type,
                              stream, entry_id, result, emitted)
    SELECT $1, i.idempotency_key, i.session_id, i.input_event_id, i.input_type, i.stream,
           i.entry_id, i.result::jsonb, i.emitted
    FROM input i JOIN idem USING (idempotency_key)
    RETURNING id
),
ob AS (
    {committed_insert_sql(agent="$1", first=10, committed="idem")}
)
SELECT idempotency_key FROM idem
"""

_STORED_SQL = """
SELECT k.idempotency_key, o.stream, o.event_id::text AS event_id, o.envelope
FROM unnest($2::text[]) AS k(idempotency_key)
JOIN mesh_idempotency i ON i.agent = $1 AND i.idempotency_key = k.idempotency_key
LEFT JOIN mesh_outbox o
       ON o.agent = i.agent AND o.idempotency_key = i.idempotency_key AND o.stream IS NOT NULL
ORDER BY o.id
"""


_MESSAGE_SQLSTATE_CLASSES = {"22", "23", "42"}  # data exception, integrity, syntax/access


def _message_fault(exc: BaseException) -> bool:
    """Is this failure about the messages written (retry them one by one, fail the bad one),
    rather than about the database being unavailable (keep the whole batch pending)?"""
    if isinstance(exc, ValueError | TypeError):  # not encodable
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _MESSAGE_SQLSTATE_CLASSES
    return False


@dataclass(kw_only=True)
class Work:
    """One handled input, ready to commit: what the agent did and what it emits."""

    idempotency_key: str
    input: Envelope
    stream: str
    entry_id: str
    result: Any = None
    audit: list[Envelope] = field(default_factory=list)  # to Kafka only
    handoffs: list[tuple[str, Envelope]] = field(default_factory=list)  # (stream, event)

    def outgoing(self) -> list[Outgoing]:
        return [Outgoing(s, e.event_id, e.to_wire()) for s, e in self.handoffs]


@dataclass
class CommitResult:
    committed: list[Work] = field(default_factory=list)
    duplicates: dict[str, list[Outgoing]] = field(default_factory=dict)  # key -> stored handoffs
    failed: list[tuple[Work, Exception]] = field(default_factory=list)


class UnitOfWork:
    def __init__(self, pool: asyncpg.Pool, agent: str) -> None:
        self.pool = pool
        self.agent = agent

    async def stored_handoffs(self, keys: Sequence[str]) -> dict[str, list[Outgoing]]:
        """For keys already committed by this agent: the handoffs they emitted, in order."""
        if not keys:
            return {}
        rows = await self.pool.fetch(_STORED_SQL, self.agent, list(keys))
        out: dict[str, list[Outgoing]] = {}
        for r in rows:
            lst = out.setdefault(r["idempotency_key"], [])
            if r["stream"] is not None:
                lst.append(Outgoing(r["stream"], r["event_id"], r["envelope"]))
        return out

    async def commit(self, works: Sequence[Work]) -> CommitResult:
        res = CommitResult()
        if not works:
            return res
        try:
            fresh = await self._commit(works)
        except Exception as exc:
            if not _message_fault(exc):
                raise  # Postgres down or restarting: the whole batch stays pending
            fresh = set()
            for w in works:
                try:
                    fresh |= await self._commit([w])
                except Exception as one:
                    if not _message_fault(one):
                        raise
                    res.failed.append((w, one))
            failed_keys = {w.idempotency_key for w, _ in res.failed}
            works = [w for w in works if w.idempotency_key not in failed_keys]
        res.committed = [w for w in works if w.idempotency_key in fresh]
        dup_keys = [w.idempotency_key for w in works if w.idempotency_key not in fresh]
        res.duplicates = await self.stored_handoffs(dup_keys)
        return res

    async def _commit(self, works: Sequence[Work]) -> set[str]:
        cols: list[list[Any]] = [[] for _ in range(8)]
        outbox = OutboxRows(agent=self.agent)
        for w in works:
            for col, val in zip(
                cols,
                (
                    w.idempotency_key,
                    w.input.event_id,
                    w.input.session_id,
                    w.input.type,
                    w.stream,
                    w.entry_id,
                    json.dumps(w.result, default=str),
                    len(w.handoffs),
                ),
                strict=True,
            ):
                col.append(val)
            for env in w.audit:  # Kafka only
                outbox.add(None, env, w.idempotency_key)
            for stream, env in w.handoffs:
                outbox.add(stream, env, w.idempotency_key)
        rows = await self.pool.fetch(_COMMIT_SQL, self.agent, *cols, *outbox.params())
        return {r["idempotency_key"] for r in rows}
