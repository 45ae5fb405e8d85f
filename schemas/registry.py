"""Event types: which payload model each has, at which schema version, on which stream.

Old events must still load years later (replay from Kafka), so every type keeps a chain of
upcasters: `v1 -> v2 -> ... -> current`. A consumer always sees the current model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from agentmesh.schemas.depth import MAX_DEPTH, too_deep
from agentmesh.schemas.envelope import MAX_ENVELOPE_BYTES, Envelope
from agentmesh.schemas.errors import (
    DecodeError,
    InvalidEncoding,
    MalformedEnvelope,
    MalformedJSON,
    Oversize,
    PoisonMessage,
    SchemaViolation,
    TooDeep,
    UnknownEventType,
    UnsupportedSchemaVersion,
    ValidatorError,
)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

# `\ud800`-`\udfff` escaped: a surrogate, which is text only as half of a valid pair
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


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
        """The largest envelope `make` builds and `decode` accepts. An agent process sets it
        from `MESH_MAX_ENVELOPE_BYTES` (agents/runner.py); the `Mesh` client checks its own
        settings' limit before every XADD."""

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
        self.check_size(env)
        return env

    def check_size(self, env: Envelope) -> None:
        """The size limit on an envelope this process makes (what `decode` refuses to read)."""
        if len(env.to_wire()) > self.max_bytes:
            raise Oversize(f"envelope is larger than {self.max_bytes} bytes")

    def decode(self, raw: bytes | str) -> Decoded:
        """Wire bytes -> (envelope, typed payload). Raises a PoisonMessage subclass on bad input.

        Whatever goes wrong while decoding one entry is poison for that entry (`decode_error`
        when nothing more precise is known): it must never fail the batch the entry came in.
        """
        try:
            return self._decode(raw)
        except PoisonMessage:
            raise
        except Exception as exc:  # RecursionError, MemoryError, a bug in a model, ...
            raise DecodeError(f"{type(exc).__name__}: {exc}") from exc

    def _decode(self, raw: bytes | str) -> Decoded:
        if isinstance(raw, str):
            try:
                raw = raw.encode()
            except UnicodeEncodeError as exc:
                raise InvalidEncoding(f"not encodable as UTF-8: {exc}") from None
        size = len(raw)
        if size > self.max_bytes:
            raise Oversize(f"envelope is {size} bytes, limit is {self.max_bytes}")
        if too_deep(raw, MAX_DEPTH):  # before parsing: the parser recurses once per level
            raise TooDeep(f"arrays/objects nested deeper than {MAX_DEPTH} levels")
        try:
            text = raw.decode()  # strict: no invalid bytes, no encoded surrogates
        except UnicodeDecodeError as exc:
            raise InvalidEncoding(f"not UTF-8: {exc}") from None
        if text.startswith("\ufeff"):  # a UTF-8 byte order mark, as json.loads(bytes) allows
            text = text[1:]
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MalformedJSON(f"not valid JSON: {exc}") from None
        except RecursionError:  # cannot happen under MAX_DEPTH; named if it ever does
            raise TooDeep("too deeply nested to parse") from None
        if "\\" in text and _SURROGATE_ESCAPE.search(text) and _lone_surrogate(data):
            raise InvalidEncoding("a string holds a lone surrogate escape (\\ud800-\\udfff)")
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
        except Exception as exc:  # a validator that raised, say, ZeroDivisionError
            raise ValidatorError(
                f"{et.name}: a validator raised {type(exc).__name__}: {exc}"
            ) from exc


def _lone_surrogate(data: Any) -> bool:
    """True when a string (or key) in parsed JSON holds a surrogate that is not half of a pair
    (json.loads joins valid pairs into one character). Only run when the text escapes one."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


registry = Registry()
"""The process-wide default registry; agents and the CLI register into it."""
