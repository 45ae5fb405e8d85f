"""What an operator request can run into. The CLI maps each kind to an exit code; a program
catches `MeshError` and reads the message."""

from __future__ import annotations


class MeshError(Exception):
    """A request that could not be carried out; the message says why, in one line."""


class InvalidRequest(MeshError):
    """Bad input: an unknown event type, a payload its schema refuses, a bad filter."""


class NotFound(MeshError):
    """The session, DLQ entry or event named does not exist (or is already gone)."""


class Conflict(MeshError):
    """Someone else acted first: another operator's decision, the deadline's, a retry."""


class Backpressure(MeshError):
    """The target stream's backlog is over its bound (`MESH_PUBLISH_MAX_BACKLOG`): nothing
    was published; try again later (or wait for room). `backlogs`: stream -> backlog seen."""

    def __init__(self, message: str, *, bound: int, backlogs: dict[str, int]) -> None:
        super().__init__(message)
        self.bound = bound
        self.backlogs = backlogs
