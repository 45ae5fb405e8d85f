"""What a handler gets besides its typed payload: the session, a way to emit events, the
idempotency key to hand to external services, a logger and the dependency breakers; for a
decision, the step the agent stored (`step`), and for any input, the copy another agent
committed (`verified_input`), so nothing that moves money is taken from the wire."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import structlog
from pydantic import BaseModel

from agentmesh.agents.provenance import stored_by
from agentmesh.agents.resilience import Dependency
from agentmesh.schemas.envelope import Envelope
from agentmesh.schemas.registry import Registry

if TYPE_CHECKING:
    from agentmesh.agents.decisions import StoredStep

T = TypeVar("T")


class Context:
    def __init__(
        self,
        *,
        agent: str,
        envelope: Envelope,
        registry: Registry,
        emits: set[str],
        dependencies: dict[str, Dependency],
        deliveries: int,
        pool: asyncpg.Pool | None = None,
    ) -> None:
        self.agent = agent
        self.envelope = envelope
        self.session_id = envelope.session_id
        self.deliveries = deliveries
        self.idempotency_key = f"{agent}:{envelope.idempotency_key}"
        """Stable across redeliveries of this input: pass it to payment APIs and the like."""
        self._registry = registry
        self._emits = emits
        self._deps = dependencies
        self.emitted: list[tuple[str, Envelope]] = []  # handoffs: (stream, event)
        self.recorded: list[Envelope] = []  # audit-only events (their type has no stream)
        self._log: Any = None
        self.pool = pool
        self.step: StoredStep | None = None
        """For a decision: the waiting step this agent stored (agents/decisions.py)."""
        self.refused: str | None = None
        """Why this input was refused without running the handler (a forged decision)."""

    @property
    def log(self) -> Any:
        """A structlog logger bound to this session, event and type (made on first use)."""
        if self._log is None:
            env = self.envelope
            self._log = structlog.get_logger(self.agent).bind(
                session=env.session_id, event=env.event_id, type=env.type
            )
        return self._log

    def emit(self, event_type: str, payload: BaseModel | dict[str, Any]) -> Envelope:
        """Queue an event; it is written to the outbox with the action and sent after commit."""
        if event_type not in self._emits:
            raise ValueError(f"agent {self.agent!r} does not declare it emits {event_type!r}")
        et = self._registry.get(event_type)
        if isinstance(payload, et.model):  # validated when it was built: not again
            env = runtime_envelope(
                self._registry,
                event_type,
                et.version,
                payload.model_dump(mode="json"),
                session_id=self.session_id,
                causation_id=self.envelope.event_id,
                source=self.agent,
            )
        else:
            env = self._registry.make(
                event_type,
                payload,
                session_id=self.session_id,
                causation_id=self.envelope.event_id,
                source=self.agent,
            )
        stream = et.stream
        if stream is None:  # audit-only: written to the outbox for Kafka, sent to no stream
            self.recorded.append(env)
        else:
            self.emitted.append((stream, env))
        return env

    def dependency(self, name: str) -> Dependency:
        return self._deps[name]

    async def call(
        self, dependency: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """Call `fn` through the named dependency's breaker, with its retry policy."""
        return await self._deps[dependency].call(fn, *args, **kwargs)

    async def verified_input(self, *, emitted_by: str) -> BaseModel:
        """This input's payload as agent `emitted_by` committed it to its outbox; raises
        `NotEmittedBy` (dead-lettered with the reason) for an event it never emitted, or one
        whose content differs (agents/provenance.py)."""
        if self.pool is None:
            raise RuntimeError("verified_input needs the agent's Postgres pool")
        stored = await stored_by(self.pool, self.envelope, agent=emitted_by)
        return self._registry.load_payload(stored)


def runtime_envelope(
    registry: Registry,
    event_type: str,
    version: int,
    payload: dict[str, Any],
    *,
    session_id: str,
    causation_id: str,
    source: str,
) -> Envelope:
    """What `registry.make` does for a payload that is valid already (a model instance, or
    the runtime's own audit record), without validating it again; the size limit holds."""
    env = Envelope.build(
        type=event_type,
        session_id=session_id,
        causation_id=causation_id,
        source=source,
        schema_version=version,
        payload=payload,
    )
    registry.check_size(env)
    return env
