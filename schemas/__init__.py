"""The wire format: the event envelope, event ids, and the registry of event types."""

from agentmesh.schemas.envelope import MAX_ENVELOPE_BYTES, Envelope
from agentmesh.schemas.errors import PoisonMessage
from agentmesh.schemas.ids import new_event_id, uuid7
from agentmesh.schemas.registry import Decoded, EventType, Registry, registry

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "Decoded",
    "Envelope",
    "EventType",
    "PoisonMessage",
    "Registry",
    "new_event_id",
    "registry",
    "uuid7",
]

import agentmesh.schemas.audit  # noqa: F401  (registers the runtime's own audit event type)
