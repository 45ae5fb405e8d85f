"""The wire format: pure logic, no server."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from pydantic import BaseModel

from agentmesh.schemas import Envelope, Registry, uuid7
from agentmesh.schemas.errors import (
    MalformedEnvelope,
    MalformedJSON,
    Oversize,
    SchemaViolation,
    UnknownEventType,
    UnsupportedSchemaVersion,
)
from agentmesh.schemas.ids import uuid7_time_ms


class V2(BaseModel):
    full_name: str
    tier: str = "free"


def make_registry() -> Registry:
    reg = Registry(max_bytes=2048)
    reg.register("user.joined", V2, stream="users", version=3)

    @reg.upcaster("user.joined", 1)
    def v1_to_v2(p: dict) -> dict:  # v1 had first/last
        return {"full_name": f"{p['first']} {p['last']}"}

    @reg.upcaster("user.joined", 2)
    def v2_to_v3(p: dict) -> dict:
        return {**p, "tier": p.get("tier", "free")}

    return reg


def test_uuid7_is_time_ordered_and_valid() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids, key=lambda u: u.int)
    assert len(set(ids)) == 5000
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert abs(uuid7_time_ms(ids[0]) - time.time() * 1000) < 5000


def test_envelope_defaults_and_round_trip() -> None:
    env = Envelope(session_id="s", type="user.joined", payload={"full_name": "A"})
    assert env.idempotency_key == env.event_id
    assert Envelope.model_validate_json(env.to_wire()) == env
    assert set(json.loads(env.to_wire())) == {
        "event_id",
        "session_id",
        "causation_id",
        "type",
        "schema_version",
        "source",
        "created_at",
        "idempotency_key",
        "payload",
    }


def test_old_versions_are_upcast() -> None:
    reg = make_registry()
    old = Envelope(
        session_id="s",
        type="user.joined",
        schema_version=1,
        payload={"first": "Ada", "last": "Lovelace"},
    )
    decoded = reg.decode(old.to_wire())
    assert decoded.payload == V2(full_name="Ada Lovelace", tier="free")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"{nope", MalformedJSON),
        (b"[1, 2]", MalformedEnvelope),
        (json.dumps({"type": "user.joined"}).encode(), MalformedEnvelope),
        (  # no event_id: a redelivery could not be told from a new event
            json.dumps(
                {"session_id": "s", "type": "user.joined", "payload": {"full_name": "A"}}
            ).encode(),
            MalformedEnvelope,
        ),
        (Envelope(session_id="s", type="nope").to_wire(), UnknownEventType),
        (
            Envelope(session_id="s", type="user.joined", schema_version=4).to_wire(),
            UnsupportedSchemaVersion,
        ),
        (
            Envelope(
                session_id="s", type="user.joined", schema_version=3, payload={"tier": 1}
            ).to_wire(),
            SchemaViolation,
        ),
        (
            Envelope(session_id="s", type="user.joined", payload={"x": "y" * 4000}).to_wire(),
            Oversize,
        ),
        (
            json.dumps({"event_id": "123", "session_id": "s", "type": "user.joined"}).encode(),
            MalformedEnvelope,
        ),
    ],
)
def test_poison_is_classified(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        make_registry().decode(raw)


def test_make_validates_before_anything_is_written() -> None:
    reg = make_registry()
    with pytest.raises(SchemaViolation):
        reg.make("user.joined", {"tier": "x"}, session_id="s")
    env = reg.make("user.joined", {"full_name": "B"}, session_id="s")
    assert env.schema_version == 3 and env.payload == {"full_name": "B", "tier": "free"}


def test_registering_a_type_twice_differently_is_refused() -> None:
    reg = make_registry()
    with pytest.raises(ValueError):
        reg.register("user.joined", V2, stream="elsewhere")
