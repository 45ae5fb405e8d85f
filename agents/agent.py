"""Writing an agent: name it, declare its dependencies, and register one handler per event type.

    planner = Agent("planner", dependencies=[DependencySpec(name="llm")])

    @planner.handler("task.submitted", needs=["llm"])
    async def plan(task: TaskSubmitted, ctx: Context) -> dict:
        outline = await ctx.call("llm", write_outline, task.goal)
        ctx.emit("plan.ready", PlanReady(outline=outline))
        return {"steps": len(outline)}

The streams an agent consumes follow from the event types it handles (each type travels on
the stream the registry names); the events it may emit are declared with `emits`.
`@planner.projection("plan.ready")` declares how an event changes the session's state, so
`mesh replay SESSION --state` can rebuild that state from the audit log alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentmesh.agents.periodic import Job, PeriodicSpec
from agentmesh.agents.resilience import DependencySpec
from agentmesh.schemas.envelope import Envelope
from agentmesh.schemas.registry import Registry
from agentmesh.schemas.registry import registry as default_registry

if TYPE_CHECKING:
    from agentmesh.agents.context import Context

Handler = Callable[[Any, "Context"], Awaitable[Any]]
Projection = Callable[[dict[str, Any], Any, Envelope], None]
"""Folds one replayed event into a session's state: `fn(state, payload, envelope)` mutates
`state`. Pure and synchronous: replay runs it years later, with no servers."""

AGENTS: dict[str, Agent] = {}
"""Every agent defined in this process, by name (what `mesh agent run NAME` looks up)."""


@dataclass(frozen=True)
class HandlerSpec:
    event_type: str
    fn: Handler
    needs: tuple[str, ...]
    timeout_s: float | None = None  # None: the process-wide MESH_HANDLER_TIMEOUT_S


class Agent:
    def __init__(
        self,
        name: str,
        *,
        emits: Iterable[str] = (),
        dependencies: Sequence[DependencySpec] = (),
        registry: Registry | None = None,
    ) -> None:
        if not name or ":" in name:
            raise ValueError("agent name must be non-empty and contain no ':'")
        self.name = name
        self.registry = registry or default_registry
        self.emits = set(emits)
        self.dependencies = {d.name: d for d in dependencies}
        self.handlers: dict[str, HandlerSpec] = {}
        self.projections: dict[str, list[Projection]] = {}
        self.periodic: list[PeriodicSpec] = []
        AGENTS[name] = self

    def handler(
        self, event_type: str, *, needs: Iterable[str] = (), timeout_s: float | None = None
    ) -> Callable[[Handler], Handler]:
        """Register the handler of `event_type`. `needs` names the dependencies whose open
        breaker pauses this stream; `timeout_s` bounds one run (a hung call would otherwise
        keep its claim alive forever through the heartbeat)."""
        needs = tuple(needs)
        for dep in needs:
            if dep not in self.dependencies:
                raise ValueError(f"{self.name}: handler needs undeclared dependency {dep!r}")

        def register(fn: Handler) -> Handler:
            self.registry.get(event_type)  # fail fast on a typo
            self.handlers[event_type] = HandlerSpec(event_type, fn, needs, timeout_s)
            return fn

        return register

    def every(self, interval_s: float) -> Callable[[Job], Job]:
        """Register a periodic job (a deadline sweep, say); one replica runs it at a time."""

        def register(fn: Job) -> Job:
            self.periodic.append(PeriodicSpec(fn.__name__, interval_s, fn))
            return fn

        return register

    def projection(self, event_type: str) -> Callable[[Projection], Projection]:
        """Register how `event_type` changes the session's state, for `mesh replay --state`."""

        def register(fn: Projection) -> Projection:
            self.registry.get(event_type)
            self.projections.setdefault(event_type, []).append(fn)
            return fn

        return register

    @property
    def streams(self) -> list[str]:
        return sorted({self.registry.stream_of(t) for t in self.handlers})

    def needs_of_stream(self, stream: str) -> set[str]:
        return {
            dep
            for t, h in self.handlers.items()
            if self.registry.stream_of(t) == stream
            for dep in h.needs
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "consumes": {t: self.registry.stream_of(t) for t in sorted(self.handlers)},
            "emits": sorted(self.emits),
            "dependencies": sorted(self.dependencies),
        }
