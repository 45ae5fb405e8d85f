"""`mesh_session_seconds`: how long sessions took from their first event to their end.

Observed by the agent whose handler ended the session (`ended(...)`), once its unit of work
committed, so a redelivery that finds the work already done does not observe it twice. The
start is the session's first outbox row (what `mesh publish` or the first agent wrote),
measured in PostgreSQL's own clock (no skew between hosts). A session older than
MESH_OUTBOX_RETENTION_S has lost its first rows to pruning and is measured from its oldest
remaining one. One query per committed group that ends sessions; a failure only loses the
observation (logged), never the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from agentmesh.agents.metrics import Metrics

log = structlog.get_logger("agentmesh.metrics")

_SQL = """
SELECT session_id, extract(epoch FROM now() - min(created_at))::float8 AS seconds
FROM mesh_outbox WHERE session_id = ANY($1::text[]) GROUP BY session_id
"""


def _outcome(result: Any) -> str | None:
    end = result.get("session_end") if isinstance(result, dict) else None
    return str(end.get("outcome", ""))[:64] if isinstance(end, dict) else None


async def observe_session_ends(
    pool: Any, metrics: Metrics, agent: str, works: Sequence[Any]
) -> None:
    """Observe each committed work item whose result ended its session."""
    ends = {w.input.session_id: o for w in works if (o := _outcome(w.result)) is not None}
    if not ends:
        return
    try:
        rows = await pool.fetch(_SQL, list(ends))
    except Exception as exc:
        log.warning("session duration not measured", error=f"{type(exc).__name__}: {exc}")
        return
    for r in rows:
        metrics.session_seconds.labels(agent, ends[r["session_id"]]).observe(
            max(0.0, float(r["seconds"]))
        )
