"""A decision type for the operator-identity tests (`mesh approve -m tests.decision_fixture`):
a waiting step's decision, on its own stream."""

from __future__ import annotations

from agentmesh.schemas import registry
from agentmesh.schemas.approval import Decision


class TestDecided(Decision):
    """The decision of the identity tests' waiting step."""


DECISION_TYPE = "t.decided"
if DECISION_TYPE not in registry:
    registry.register(DECISION_TYPE, TestDecided, stream="t:decisions")
