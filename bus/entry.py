"""A stream entry as the runtime sees it: where it came from, its raw bytes, how often delivered."""

from __future__ import annotations

from dataclasses import dataclass

ENVELOPE_FIELD = b"envelope"


@dataclass(kw_only=True)
class StreamEntry:
    stream: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def raw(self) -> bytes:
        """The envelope bytes, verbatim. A missing field yields b'' (which fails to decode)."""
        return self.fields.get(ENVELOPE_FIELD, b"")


@dataclass(frozen=True)
class Outgoing:
    """An event to XADD: its stream, its id (for dedup) and its wire bytes."""

    stream: str
    event_id: str
    wire: bytes | str
