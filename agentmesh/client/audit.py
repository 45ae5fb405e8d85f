"""The Kafka audit log for operators: replay a session, re-send what a server lost."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from agentmesh.outbox.replay import Replay, Until, replay_session
from agentmesh.outbox.resend import Actor, ResendResult, Selection
from agentmesh.outbox.resend import redrive as _redrive
from agentmesh.outbox.resend import republish as _republish
from agentmesh.outbox.snapshots import StateReplay
from agentmesh.outbox.snapshots import replay_state as _replay_state

if TYPE_CHECKING:
    from agentmesh.client.mesh import Mesh

Progress = Callable[[int, int | None], None]


async def replay(
    mesh: Mesh,
    session_id: str,
    *,
    until: Until | None = None,
    scan: bool = False,
    progress: Progress | None = None,
) -> Replay:
    return await replay_session(mesh.settings, session_id, until=until, use_index=not scan,
                                progress=progress)  # fmt: skip


async def republish(
    mesh: Mesh,
    selection: Selection,
    *,
    reason: str,
    wait_s: float,
    progress: Progress | None,
) -> ResendResult:
    actor = Actor(operator=mesh.operator, reason=reason)
    return await _republish(mesh.settings, selection, wait_s=wait_s, progress=progress,
                            actor=actor)  # fmt: skip


async def redrive(
    mesh: Mesh, selection: Selection, *, reason: str, progress: Progress | None
) -> ResendResult:
    actor = Actor(operator=mesh.operator, reason=reason)
    return await _redrive(mesh.settings, selection, progress=progress, actor=actor)


async def replay_state(
    mesh: Mesh,
    session_id: str,
    agents: Iterable[Any],
    *,
    progress: Progress | None = None,
) -> StateReplay:
    """The session's state folded through the agents' projections: from its stored snapshot
    and the records after it when there is a sound one, else from the whole log."""
    return await _replay_state(mesh.settings, session_id, agents, progress=progress)
