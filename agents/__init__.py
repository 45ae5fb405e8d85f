"""Writing and running agents: the declarative `Agent`, the handler `Context`, resilience
helpers, and the `Runner` that runs one agent type as its own process."""

from agentmesh.agents.agent import AGENTS, Agent
from agentmesh.agents.context import Context
from agentmesh.agents.resilience import (
    Budget,
    BudgetExhausted,
    DependencySpec,
    NonRetryable,
    RetryPolicy,
)

__all__ = [
    "AGENTS",
    "Agent",
    "Budget",
    "BudgetExhausted",
    "Context",
    "DependencySpec",
    "NonRetryable",
    "RetryPolicy",
]
