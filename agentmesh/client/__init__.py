"""The operator's API as a library: `Mesh` and the dataclasses its methods return."""

from agentmesh.client.decisions import ActedOn, DecisionOutcome
from agentmesh.client.dlq import DeadLetters, DlqEdit, DlqEntry, DlqFilter, DlqOutcome
from agentmesh.client.errors import Backpressure, Conflict, InvalidRequest, MeshError, NotFound
from agentmesh.client.mesh import Mesh, NewEvent, Published
from agentmesh.client.sessions import SessionState
from agentmesh.client.status import (
    BreakerStatus,
    ConsumerStatus,
    MeshStatus,
    RelayMember,
    RelayStatus,
    StreamStatus,
)

__all__ = [
    "ActedOn",
    "Backpressure",
    "BreakerStatus",
    "Conflict",
    "ConsumerStatus",
    "DeadLetters",
    "DecisionOutcome",
    "DlqEdit",
    "DlqEntry",
    "DlqFilter",
    "DlqOutcome",
    "InvalidRequest",
    "Mesh",
    "MeshError",
    "MeshStatus",
    "NewEvent",
    "NotFound",
    "Published",
    "RelayMember",
    "RelayStatus",
    "SessionState",
    "StreamStatus",
]
