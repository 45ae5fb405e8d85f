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
_MAX_NAME = 200  # session_id, type and source (Field max_length below)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """One event. Immutable once made; `payload` is validated against the registry separately."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=64)
    session_id: str = Field(min_length=1, max_length=_MAX_NAME)
    causation_id: str | None = Field(default=None, max_length=64)
    type: str = Field(min_length=1, max_length=_MAX_NAME)
    schema_version: int = Field(default=1, ge=1)
    source: str = Field(default="external", min_length=1, max_length=_MAX_NAME)
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
            _set(self, "idempotency_key", self.event_id)
        _set(self, "_wire_cache", None)  # unset, to_wire would pay for an AttributeError

    @classmethod
    def build(
        cls,
        *,
        type: str,
        session_id: str,
        causation_id: str | None,
        source: str,
        schema_version: int,
        payload: dict[str, Any],
    ) -> Envelope:
        """An envelope the runtime makes from parts that are valid already: `session_id` and
        `causation_id` from an envelope validated on receipt, `type` and `schema_version`
        from the registry, `payload` dumped from a validated model, a fresh id and time.

        Validating those again cost more than the rest of a hop's Python (a profile of an
        agent under load: envelope construction and validation, ~6 us each, twice per
        message), so the fields are set directly, exactly as validation would have left them.
        Parts that do not fit the field limits (an over-long agent name) take the validated
        path and fail there, as before."""
        if not (
            0 < len(session_id) <= _MAX_NAME
            and 0 < len(type) <= _MAX_NAME
            and 0 < len(source) <= _MAX_NAME
            and schema_version >= 1
            and (causation_id is None or _CANONICAL_UUID.fullmatch(causation_id))
        ):
            return cls(
                type=type,
                session_id=session_id,
                causation_id=causation_id,
                source=source,
                schema_version=schema_version,
                payload=payload,
            )
        event_id = new_event_id()
        env = object.__new__(cls)
        _set(
            env,
            "__dict__",
            {
                "event_id": event_id,
                "session_id": session_id,
                "causation_id": causation_id,
                "type": type,
                "schema_version": schema_version,
                "source": source,
                "created_at": utcnow(),
                "idempotency_key": event_id,
                "payload": payload,
            },
        )
        _set(env, "__pydantic_fields_set__", set(_FIELDS))
        _set(env, "__pydantic_extra__", None)
        _set(env, "__pydantic_private__", None)
        _set(env, "_wire_cache", None)
        return env

    def __hash__(self) -> int:  # the payload dict is not hashable; the id is unique
        return hash(self.event_id)

    def to_wire(self) -> bytes:
        """The JSON bytes; computed once (the envelope is immutable), then reused for the size
        check, the outbox row and the XADD."""
        wire: bytes | None = getattr(self, "_wire_cache", None)  # a copy has none
        if wire is None:
            wire = self.__pydantic_serializer__.to_json(self)
            _set(self, "_wire_cache", wire)
        return wire

    def to_json(self) -> str:
        return self.to_wire().decode()


_set = object.__setattr__
_FIELDS = frozenset(Envelope.model_fields)
