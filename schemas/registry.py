"""Event types: which payload model each has, at which schema version, on which stream.

Old events must still load years later (replay from Kafka), so every type keeps a chain of
upcasters: `v1 -> v2 -> ... -> current`. A consumer always sees the current model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from agentmesh.schemas.envelope import MAX_ENVELOPE_BYTES, Envelope
from agentmesh.schemas.errors import (
    MalformedEnvelope,
    MalformedJSON,
    Oversize,
    SchemaViolation,
    UnknownEventType,
    UnsupportedSchemaVersion,
)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(kw_only=True)
class EventType:
    name: str
    model: type[BaseModel]
    version: int
    stream: str | None  # None: audit-only, never handed off on Redis
    upcasters: dict[int, Upcaster] = field(default_factory=dict)  # from-version -> fn


@dataclass(frozen=True)
class Decoded:
    envelope: Envelope
    payload: BaseModel


class Registry:
    """Maps event type names to payload models; decodes raw wire bytes into typed events."""

    def __init__(self, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> None:
        self._types: dict[str, EventType] = {}
        self.max_bytes = max_bytes

    def register(
        self, name: str, model: type[BaseModel], *, stream: str | None, version: int = 1
    ) -> EventType:
        existing = self._types.get(name)
        if existing is not None and (existing.model is not model or existing.stream != stream):
            raise ValueError(f"event type {name!r} is already registered differently")
        et = existing or EventType(name=name, model=model, version=version, stream=stream)
        self._types[name] = et
        return et

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: turn a payload of `from_version` into `from_version + 1`."""

        def wrap(fn: Upcaster) -> Upcaster:
            self.get(name).upcasters[from_version] = fn
            return fn

        return wrap

    def get(self, name: str) -> EventType:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownEventType(f"unknown event type {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def types(self) -> list[EventType]:
        return sorted(self._types.values(), key=lambda t: t.name)

    def stream_of(self, name: str) -> str:
        stream = self.get(name).stream
        if stream is None:
            raise ValueError(f"event type {name!r} is audit-only and has no stream")
        return stream

    def make(self, name: str, payload: BaseModel | dict[str, Any], **fields: Any) -> Envelope:
        """Build an envelope for `name`, validating the payload against the current model."""
        et = self.get(name)
        if isinstance(payload, et.model):
            model: BaseModel = payload  # already validated when it was built
        else:
            data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
            model = self._validate(et, data)
        env = Envelope(
            type=name,
            schema_version=et.version,
            payload=model.model_dump(mode="json"),
            **fields,
        )
        if len(env.to_wire()) > self.max_bytes:
            raise Oversize(f"envelope is larger than {self.max_bytes} bytes")
        return env

    def decode(self, raw: bytes | str) -> Decoded:
        """Wire bytes -> (envelope, typed payload). Raises a PoisonMessage subclass on bad input."""
        size = len(raw)
        if size > self.max_bytes:
            raise Oversize(f"envelope is {size} bytes, limit is {self.max_bytes}")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedJSON(f"not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise MalformedEnvelope("envelope must be a JSON object")
        if not data.get("event_id"):
            # Defaulting it here would give every redelivery of these bytes a new id, and so a
            # new idempotency key: the same message would be handled once per delivery.
            raise MalformedEnvelope(
                "event_id is required on the wire (a UUID, the same on retries)"
            )
        try:
            env = Envelope.model_validate(data)
        except ValidationError as exc:
            raise MalformedEnvelope(_short(exc)) from None
        return Decoded(env, self.load_payload(env))

    def load_payload(self, env: Envelope) -> BaseModel:
        et = self.get(env.type)
        version = env.schema_version
        if version > et.version:
            raise UnsupportedSchemaVersion(
                f"{env.type} v{version} is newer than this agent knows (v{et.version})"
            )
        data = dict(env.payload)
        while version < et.version:
            step = et.upcasters.get(version)
            if step is None:
                raise UnsupportedSchemaVersion(
                    f"{env.type} v{version} has no upcaster to v{version + 1}"
                )
            try:
                data = step(data)
            except Exception as exc:
                raise SchemaViolation(
                    f"{env.type} upcaster v{version}->v{version + 1} failed: {exc}"
                ) from None
            version += 1
        return self._validate(et, data)

    @staticmethod
    def _validate(et: EventType, data: dict[str, Any]) -> BaseModel:
        try:
            return et.model.model_validate(data)
        except ValidationError as exc:
            raise SchemaViolation(f"{et.name}: {_short(exc)}") from None


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


registry = Registry()
"""The process-wide default registry; agents and the CLI register into it."""
