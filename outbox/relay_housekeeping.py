"""Outbox upkeep beside the rounds: the backlog gauges, and pruning published rows.

Apart from the round so that it runs on its own schedule and keeps the backlog metrics current
while a round waits on a broker that is down.
"""

from __future__ import annotations

from agentmesh.outbox.relay_state import RelayState

PRUNE_LOCK_CLASS = 0x6D657370  # "mesp": one pruner at a time

_BACKLOG_SQL = """
SELECT count(*) AS rows,
       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest_s
FROM mesh_outbox WHERE published_at IS NULL
"""

_PRUNE_SQL = """
DELETE FROM mesh_outbox WHERE id IN (
    SELECT id FROM mesh_outbox
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
    LIMIT $2)
"""


class Housekeeping(RelayState):
    """`backlog()` and `prune()`, each one statement batch on the pool."""

    async def backlog(self) -> tuple[int, float]:
        assert self.pool is not None
        r = await self.pool.fetchrow(_BACKLOG_SQL)
        assert r is not None
        self.metrics.backlog_rows.set(r["rows"])
        self.metrics.backlog_age.set(r["oldest_s"])
        return int(r["rows"]), float(r["oldest_s"])

    async def prune(self, chunk: int = 5000) -> int:
        """Delete published rows past the retention (one relay at a time)."""
        assert self.pool is not None
        total = 0
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, 0)", PRUNE_LOCK_CLASS):
                return 0
            try:
                while True:
                    status = await conn.execute(_PRUNE_SQL, self.s.outbox_retention_s, chunk)
                    n = int(status.split()[-1])
                    total += n
                    if n < chunk:
                        break
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, 0)", PRUNE_LOCK_CLASS)
        self.metrics.pruned.inc(total)
        return total
