"""Redis Streams transport: consumer groups, idempotent publish, reclaim, DLQ and safe trimming."""

from bus.deadletter import DeadLetter
from bus.entry import Outgoing, StreamEntry
from bus.streams import Streams, dedup_key

__all__ = ["DeadLetter", "Outgoing", "StreamEntry", "Streams", "dedup_key"]
