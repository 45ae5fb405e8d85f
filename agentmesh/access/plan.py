"""What each credential may touch, from the declarations of the agents loaded in this process.

An agent reads the streams of the event types it handles, and writes the streams of the
types it declares in `emits`, plus the stream of any decision type it handles (a waiting
step's own deadline sweep publishes the `expire` decision onto it). Nothing else: a type it
neither handles nor emits is a stream its credential cannot touch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from agentmesh.agents.agent import Agent
from agentmesh.schemas.approval import Decision
from agentmesh.schemas.registry import Registry
from agentmesh.schemas.registry import registry as default_registry

_SAFE = re.compile(r"[^a-z0-9_]")


def role_suffix(name: str) -> str:
    """An agent name as part of a PostgreSQL role or Redis user name (lower case, [a-z0-9_])."""
    return _SAFE.sub("_", name.lower())


@dataclass(frozen=True, kw_only=True)
class AgentAccess:
    name: str
    reads: tuple[str, ...]  # input streams (its consumer group is its name)
    writes: tuple[str, ...]  # output streams
    budgets: tuple[str, ...] = ()  # dependencies with a shared rate budget (mesh:budget:<name>)

    @property
    def redis_user(self) -> str:
        return f"mesh-agent-{self.name}"

    @property
    def pg_role(self) -> str:
        return f"mesh_agent_{role_suffix(self.name)}"


@dataclass(frozen=True, kw_only=True)
class AccessPlan:
    agents: tuple[AgentAccess, ...]
    dlq_stream: str
    streams: tuple[str, ...]  # every registered stream
    decision_streams: tuple[str, ...]  # streams of decision types (mesh approve|reject)
    entry_streams: tuple[str, ...]  # read by an agent, written by none: where work comes in


def _decision_types(reg: Registry) -> set[str]:
    return {
        t.name
        for t in reg.types()
        if t.stream and isinstance(t.model, type) and issubclass(t.model, Decision)
    }


def plan_for(
    agents: Iterable[Agent], *, dlq_stream: str, reg: Registry | None = None
) -> AccessPlan:
    reg = reg or default_registry
    decisions = _decision_types(reg)
    out: list[AgentAccess] = []
    for a in sorted(agents, key=lambda a: a.name):
        reads = tuple(a.streams)
        own_decisions = {t for t in a.handlers if t in decisions}
        writes = sorted(
            {s for t in a.emits | own_decisions if (s := reg.get(t).stream)} - {dlq_stream}
        )
        budgets = tuple(sorted(n for n, d in a.dependencies.items() if d.budget is not None))
        out.append(AgentAccess(name=a.name, reads=reads, writes=tuple(writes), budgets=budgets))
    roles: dict[str, str] = {}
    for acc in out:
        if acc.pg_role in roles:
            raise ValueError(f"agents {roles[acc.pg_role]!r} and {acc.name!r} would share the "
                             f"PostgreSQL role {acc.pg_role}: rename one")  # fmt: skip
        roles[acc.pg_role] = acc.name
    streams = sorted({t.stream for t in reg.types() if t.stream})
    written = {s for a in out for s in a.writes}
    read = {s for a in out for s in a.reads}
    return AccessPlan(
        agents=tuple(out),
        dlq_stream=dlq_stream,
        streams=tuple(streams),
        decision_streams=tuple(sorted({reg.stream_of(t) for t in decisions})),
        entry_streams=tuple(sorted(read - written)),
    )
