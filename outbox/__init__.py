"""PostgreSQL: schema migrations and the unit of work (idempotency, actions, outbox)."""

from agentmesh.outbox.migrate import migrate
from agentmesh.outbox.unit_of_work import CommitResult, UnitOfWork, Work

__all__ = ["CommitResult", "UnitOfWork", "Work", "migrate"]
