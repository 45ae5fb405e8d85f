"""The envelope every event travels in, on Redis, in Postgres and in Kafka.

The wire form is a single JSON object (see docs/wire-format.md), so producers in any language
can publish. The envelope is the unit of dedup: `event_id` is unique per event, and
`idempotency_key` (by default the event id) is what a consuming agent records to detect a
redelivery.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentmesh.schemas.ids import new_event_id

MAX_ENVELOPE_BYTES = 256 * 1024
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """One event. Immutable once made; `payload` is validated against the registry separately."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=64)
    session_id: str = Field(min_length=1, max_length=200)
    causation_id: str | None = Field(default=None, max_length=64)
    type: str = Field(min_length=1, max_length=200)
    schema_version: int = Field(default=1, ge=1)
    source: str = Field(default="external", min_length=1, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)
    idempotency_key: str = Field(default="", max_length=400)
    payload: dict[str, Any] = Field(default_factory=dict)

    __slots__ = ("_wire_cache",)  # the JSON bytes, once made (a pydantic private attribute
    # would cost more per envelope than the serialisation it saves)

    @field_validator("event_id", "causation_id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        # Postgres stores ids as uuid; a non-UUID id is rejected here, as poison, not later.
        if value is None or _CANONICAL_UUID.fullmatch(value):
            return value
        return str(uuid.UUID(value))

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def model_post_init(self, __context: Any) -> None:
        if not self.idempotency_key:
            object.__setattr__(self, "idempotency_key", self.event_id)

    def __hash__(self) -> int:  # the payload dict is not hashable; the id is unique
        return hash(self.event_id)

    def to_wire(self) -> bytes:
        """The JSON bytes; computed once (the envelope is immutable), then reused for the size
        check, the outbox row and the XADD."""
        try:
            return self._wire_cache  # type: ignore[attr-defined,no-any-return]
        except AttributeError:
            wire: bytes = self.__pydantic_serializer__.to_json(self)
            object.__setattr__(self, "_wire_cache", wire)
            return wire

    def to_json(self) -> str:
        return self.to_wire().decode()
