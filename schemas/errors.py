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
