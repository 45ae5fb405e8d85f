"""The envelope size limit as the `Mesh` client applies it before any XADD: the same
`MESH_MAX_ENVELOPE_BYTES` consumers enforce, so what an operator sends is never refused,
as oversize, by the agent that reads it."""

from __future__ import annotations

from agentmesh.settings import Settings


def oversize(raw: bytes, settings: Settings) -> str | None:
    """None when `raw` is within the limit, else why not (one line)."""
    limit = settings.max_envelope_bytes
    if len(raw) <= limit:
        return None
    return f"envelope is {len(raw)} bytes, over MESH_MAX_ENVELOPE_BYTES ({limit})"
