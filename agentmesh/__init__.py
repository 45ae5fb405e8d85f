"""agentmesh: AI agents as a choreographed mesh over Redis Streams, a PostgreSQL outbox and a
Kafka audit log. This page is the whole user surface:

- writing agents: `Agent`, `Context`, `registry` (the event types), `DependencySpec` and
  `RetryPolicy` (calls to the outside world), `Budget` (a rate limit shared by every
  replica), `NonRetryable`, `waiting`/`ended` (a step that waits on a human, the end of a
  session), `Tick` (periodic work);
- running and operating a mesh: `Settings`/`load_settings`, and `Mesh`, the operator's client
  (publish, follow, approve/reject, the DLQ, status, replay);
- read models folded from the audit log: `Projection` (name, table DDL, `@fold` function that
  gets a `ReplayedEvent` and a `ProjectionTx`), run by `mesh projection run NAME`.

Everything else is importable from its module (`agentmesh.agents`, `.bus`, `.outbox`,
`.schemas`) but is not needed to write an agent.
"""

from agentmesh._version import __version__
from agentmesh.agents import Agent, Budget, Context, DependencySpec, NonRetryable, RetryPolicy
from agentmesh.agents.periodic import Tick
from agentmesh.client import Mesh
from agentmesh.outbox.projection import Projection, ProjectionTx
from agentmesh.outbox.replay import ReplayedEvent
from agentmesh.schemas import registry
from agentmesh.schemas.approval import Decision, decision_key, ended, waiting
from agentmesh.settings import Settings, load_settings

__all__ = [
    "Agent",
    "Budget",
    "Context",
    "Decision",
    "DependencySpec",
    "Mesh",
    "NonRetryable",
    "Projection",
    "ProjectionTx",
    "ReplayedEvent",
    "RetryPolicy",
    "Settings",
    "Tick",
    "__version__",
    "decision_key",
    "ended",
    "load_settings",
    "registry",
    "waiting",
]
