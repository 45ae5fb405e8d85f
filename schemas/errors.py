"""Why an input is poison: each is final, so the runtime dead-letters it at once without retries."""

from __future__ import annotations


class PoisonMessage(Exception):
    """Input that no retry can fix. `reason` is a short, stable code for operators and filters."""

    reason = "poison"


class MalformedJSON(PoisonMessage):
    reason = "malformed_json"


class MalformedEnvelope(PoisonMessage):
    reason = "malformed_envelope"


class UnknownEventType(PoisonMessage):
    reason = "unknown_type"


class UnsupportedSchemaVersion(PoisonMessage):
    reason = "unsupported_schema_version"


class SchemaViolation(PoisonMessage):
    reason = "schema_violation"


class Oversize(PoisonMessage):
    reason = "oversize"


class TooDeep(PoisonMessage):
    """Arrays and objects nested deeper than the wire format allows (schemas/depth.py): the
    parser would recurse once per level, and at ~1,000 levels it raises RecursionError."""

    reason = "too_deep"


class InvalidEncoding(PoisonMessage):
    """Not UTF-8, or a string with a lone surrogate (`"\\ud800"`): text no UTF-8 system
    (Postgres, Kafka consumers, our own serialiser) can store or send on."""

    reason = "invalid_encoding"


class ValidatorError(PoisonMessage):
    """A validator of the payload model raised something other than a validation error (a
    model that did not foresee this input); no retry runs different code."""

    reason = "validator_error"


class DecodeError(PoisonMessage):
    """Anything else that went wrong while decoding one entry; the message names the
    exception's type. The entry, not its batch, is at fault."""

    reason = "decode_error"
