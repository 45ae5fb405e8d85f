"""The read gate of shared budgets: which streams not to read while budgets are empty.

A stream is paused when every handler on it needs a dependency whose budget this replica
last found without room: each new entry would only be parked. A stream with one handler
that needs no empty budget is still read (that handler can work). Entries already read wait
parked and come back when the bucket has room (agents/resilience.py, agents/failures.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from agentmesh.agents.agent import Agent
from agentmesh.agents.resilience import Dependency


def budget_paused(agent: Agent, dependencies: Mapping[str, Dependency]) -> set[str]:
    empty = {name for name, dep in dependencies.items() if dep.budget_empty}
    if not empty:
        return set()
    by_stream: dict[str, list[bool]] = {}
    for event_type, spec in agent.handlers.items():
        stream = agent.registry.stream_of(event_type)
        by_stream.setdefault(stream, []).append(bool(empty & set(spec.needs)))
    return {stream for stream, blocked in by_stream.items() if all(blocked)}
