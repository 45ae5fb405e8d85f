"""Redis Streams transport: consumer groups, idempotent publish, reclaim, DLQ and safe trimming."""

from agentmesh.bus.deadletter import DeadLetter
from agentmesh.bus.entry import Outgoing, StreamEntry
from agentmesh.bus.streams import Streams, dedup_key

__all__ = ["DeadLetter", "Outgoing", "StreamEntry", "Streams", "dedup_key"]
