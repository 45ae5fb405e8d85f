"""`MESH_MAX_ENVELOPE_BYTES`, enforced by a consumer before it parses anything: an entry whose
envelope is larger is dead-lettered with reason `oversize` and only its first KEEP_BYTES
(the DLQ must not become the place a flood of huge entries is stored twice)."""

from __future__ import annotations

from agentmesh.bus.entry import ENVELOPE_FIELD, StreamEntry
from agentmesh.schemas.errors import Oversize

KEEP_BYTES = 4096
"""How much of an oversize envelope its DLQ entry keeps: enough to see what it was."""


def oversize(entry: StreamEntry, limit: int) -> tuple[StreamEntry, Oversize] | None:
    """None when the envelope is within `limit`; else the entry cut to KEEP_BYTES (same
    stream, id and deliveries, so dead-lettering it acks the original) and the error."""
    size = len(entry.raw)
    if size <= limit:
        return None
    cut = StreamEntry(
        stream=entry.stream,
        id=entry.id,
        fields={ENVELOPE_FIELD: entry.raw[:KEEP_BYTES]},
        deliveries=entry.deliveries,
    )
    why = (
        f"envelope is {size} bytes, over MESH_MAX_ENVELOPE_BYTES ({limit}); "
        f"the DLQ keeps its first {min(size, KEEP_BYTES)} bytes only"
    )
    return cut, Oversize(why)
