"""`Mesh`: the operator's API to a running mesh, as a library.

Everything an operator does (publish and follow a session, decide a waiting step, work the
dead-letter queue, re-send what a server lost, read status, replay a session) is a method
here that returns dataclasses and prints nothing. `mesh` (the CLI), the demos, the tests and
the benchmarks are callers of this class, as a notebook or an admin API would be.

Connections are opened on first use, so a command that needs only Redis works while
PostgreSQL is down. Every write an operator makes is recorded in the audit log first, under
`operator` (default: `MESH_OPERATOR`, else the login).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncpg
from redis.asyncio import Redis

from agentmesh import connect
from agentmesh.bus import Streams
from agentmesh.bus.backlog import backlogs
from agentmesh.client import audit, decisions
from agentmesh.client.dlq import DeadLetters
from agentmesh.client.errors import Backpressure, InvalidRequest
from agentmesh.client.limits import oversize
from agentmesh.client.projections import Projections
from agentmesh.client.sessions import SessionState, session_states
from agentmesh.client.status import MeshStatus, RelayStatus, collect, relay_status
from agentmesh.outbox.operator import current_operator
from agentmesh.outbox.publish import publish_events
from agentmesh.outbox.replay import Replay, Until
from agentmesh.outbox.resend import ResendResult, Selection
from agentmesh.outbox.snapshots import StateReplay
from agentmesh.schemas import Envelope, PoisonMessage, registry
from agentmesh.schemas.ids import new_event_id
from agentmesh.settings import Settings, load_settings

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True, kw_only=True)
class Published:
    event_id: str
    session_id: str
    stream: str
    entry_id: str | None  # None: the event id was already on its stream (deduplicated)


@dataclass(frozen=True, kw_only=True)
class NewEvent:
    """One event of `Mesh.publish_batch` (the arguments of `Mesh.publish`)."""

    event_type: str
    payload: dict[str, Any]
    session_id: str | None = None
    idempotency_key: str | None = None
    stream: str | None = None


class Mesh:
    """A client of one mesh (its Redis, PostgreSQL and Kafka). Use as an async context
    manager, or call `close()`."""

    def __init__(self, settings: Settings | None = None, *, operator: str | None = None):
        self.settings = settings or load_settings()
        self.operator = operator or current_operator()
        self.dlq = DeadLetters(self)
        self.projections = Projections(self)  # read models folded from the audit log
        self._redis: Redis | None = None
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # -- connections ----------------------------------------------------------------------
    @property
    def redis(self) -> Redis:
        if self._redis is None:
            self._redis = connect.redis_client(self.settings)
        return self._redis

    async def pg(self) -> asyncpg.Pool:
        """The PostgreSQL pool, opened on first use."""
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await connect.pg_pool(self.settings, min_size=1, max_size=4)
        return self._pool

    @property
    def streams(self) -> Streams:
        """A publisher on the bus (deduplicating XADD); it reads no stream."""
        return Streams(self.redis, group="-", consumer="-", dedup_ttl_s=self.settings.dedup_ttl_s)

    # -- sessions -------------------------------------------------------------------------
    async def publish(
        self,
        event_type: str,
        payload: dict[str, Any],
        *,
        session_id: str | None = None,
        idempotency_key: str | None = None,
        stream: str | None = None,
        source: str | None = None,
        backlog_wait_s: float | None = None,
    ) -> Published:
        """Validate `payload` against its event type (registered by the agents module), write
        the outbox row, then XADD it onto the type's stream. Raises InvalidRequest, or
        Backpressure when the stream's backlog has no room for it within `backlog_wait_s`
        (default `MESH_PUBLISH_BACKLOG_WAIT_S`; nothing is published then)."""
        event = NewEvent(event_type=event_type, payload=payload, session_id=session_id,
                         idempotency_key=idempotency_key, stream=stream)  # fmt: skip
        (sent,) = await self.publish_batch([event], source=source, backlog_wait_s=backlog_wait_s)
        return sent

    async def publish_batch(
        self,
        events: Sequence[NewEvent],
        *,
        source: str | None = None,
        backlog_wait_s: float | None = None,
    ) -> list[Published]:
        """Publish several events, all or nothing: every one is validated, and the backlog of
        every target stream must have room for all of its events, before any is written
        (outbox rows in one statement, then one XADD script)."""
        pairs = [self._envelope(e, source) for e in events]
        if not pairs:
            return []
        wait = self.settings.publish_backlog_wait_s if backlog_wait_s is None else backlog_wait_s
        await self.make_room(Counter(stream for stream, _ in pairs), wait_s=wait)
        entry_ids = await publish_events(await self.pg(), self.streams, pairs)
        return [
            Published(event_id=env.event_id, session_id=env.session_id, stream=stream,
                      entry_id=entry_id)
            for (stream, env), entry_id in zip(pairs, entry_ids, strict=True)
        ]  # fmt: skip

    def _envelope(self, event: NewEvent, source: str | None) -> tuple[str, Envelope]:
        event_type = event.event_type
        try:
            expected = registry.stream_of(event_type)
            fields: dict[str, Any] = {
                "session_id": event.session_id or f"s-{new_event_id()}",
                "source": source or f"cli:{self.operator}",
            }
            if event.idempotency_key:
                fields["idempotency_key"] = event.idempotency_key
            env = registry.make(event_type, event.payload, **fields)
        except PoisonMessage as exc:
            raise InvalidRequest(f"invalid {event_type} payload: {exc}") from None
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not expected:
            raise InvalidRequest(f"event type {event_type} has no stream to publish on")
        if event.stream is not None and event.stream != expected:
            raise InvalidRequest(
                f"{event_type} travels on stream {expected!r}, not {event.stream!r}"
            )
        if too_big := oversize(env.to_wire(), self.settings):
            raise InvalidRequest(f"{too_big}: not published")
        return expected, env

    async def make_room(self, counts: dict[str, int], *, wait_s: float = 0.0) -> None:
        """Return once every stream in `counts` (stream -> events to add) has room for them
        under `MESH_PUBLISH_MAX_BACKLOG`, checking again every 0.2 s; raise Backpressure when
        there is none within `wait_s`. Not atomic with the XADD: publishers racing each other
        can overshoot the bound by what they publish at that moment, never more."""
        bound = self.settings.publish_max_backlog
        if not bound or not counts:
            return
        for stream, n in counts.items():
            if n > bound:
                raise Backpressure(
                    f"{n} events for {stream} are more than its backlog bound of {bound} "
                    "(MESH_PUBLISH_MAX_BACKLOG) on their own; nothing was published",
                    bound=bound, backlogs={},
                )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            seen = await backlogs(self.redis, list(counts), cap=bound)
            over = {st: b for st, b in seen.items() if b + counts[st] > bound}
            if not over:
                return
            left = deadline - loop.time()
            if left <= 0:
                what = ", ".join(f"{st} has {b}" for st, b in sorted(over.items()))
                waited = f" after waiting {wait_s:g} s" if wait_s else ""
                raise Backpressure(
                    f"backlog over its bound{waited}: {what} entries its consumers have not "
                    f"finished (lag + pending), bound {bound} (MESH_PUBLISH_MAX_BACKLOG); "
                    "nothing was published, try again later",
                    bound=bound, backlogs=seen,
                )  # fmt: skip
            await asyncio.sleep(min(0.2, left))

    async def sessions(self, *, status: str | None = None, limit: int = 50) -> list[SessionState]:
        """Recent sessions, newest activity first; `status`: running, waiting or ended."""
        return await session_states(await self.pg(), status=status, limit=limit)

    async def session(self, session_id: str) -> SessionState | None:
        found = await session_states(await self.pg(), session_id=session_id, limit=1)
        return found[0] if found else None

    async def follow(
        self,
        session_id: str,
        *,
        timeout_s: float = 120.0,
        on_update: Callable[[SessionState], None] | None = None,
    ) -> SessionState | None:
        """Poll a session until it ends or waits on a human; the last state seen (None: no
        agent acted in it within the time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        state: SessionState | None = None
        while loop.time() < deadline:
            state = await self.session(session_id)
            if state is not None and on_update is not None:
                on_update(state)
            if state is not None and state.status in ("ended", "waiting"):
                return state
            await asyncio.sleep(0.3)
        return state

    async def approve(self, session_id: str, *, reason: str = "") -> decisions.DecisionOutcome:
        """Approve the step the session waits on; tells which decision the agent acted on."""
        return await decisions.decide(self, session_id, "approve", reason)

    async def reject(self, session_id: str, *, reason: str) -> decisions.DecisionOutcome:
        """Reject the step the session waits on (the session is compensated and closed)."""
        return await decisions.decide(self, session_id, "reject", reason)

    # -- status and the audit log ---------------------------------------------------------
    async def unpublished(self, *, session_id: str | None = None) -> int:
        """Outbox rows (of one session, or all) the relay has not yet sent to Kafka."""
        pool = await self.pg()
        n = await pool.fetchval(
            "SELECT count(*) FROM mesh_outbox WHERE published_at IS NULL "
            "AND ($1::text IS NULL OR session_id = $1)",
            session_id,
        )
        return int(n)

    async def wait_published(
        self, *, session_id: str | None = None, timeout_s: float = 30.0
    ) -> int:
        """Wait until the relay has sent every outbox row (of one session, or all) to Kafka;
        the rows still unsent when the time is up (0: all in the audit log)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = await self.unpublished(session_id=session_id)
            if not left or loop.time() >= deadline:
                return left
            await asyncio.sleep(0.1)

    async def status(self, *, streams: set[str] | None = None) -> MeshStatus:
        """Streams (lag, pending, consumers), DLQ depth, breakers, relay backlog. `streams`:
        the mesh's known streams to include even if empty; None lists every stream."""
        return await collect(self, known=streams)

    async def relay_status(self) -> RelayStatus:
        return await relay_status(self)

    async def replay(
        self,
        session_id: str,
        *,
        until: Until | None = None,
        scan: bool = False,
        progress: Progress | None = None,
    ) -> Replay:
        """A session's events from the Kafka audit log, each once, in causal order."""
        return await audit.replay(self, session_id, until=until, scan=scan, progress=progress)

    async def replay_state(
        self, session_id: str, agents: Iterable[Any], *, progress: Progress | None = None
    ) -> StateReplay:
        """A session's state (the agents' projections): from its stored snapshot plus the
        records after it when there is a sound one, else from the whole log."""
        return await audit.replay_state(self, session_id, agents, progress=progress)

    async def republish(
        self,
        selection: Selection,
        *,
        reason: str = "",
        wait_s: float = 120.0,
        progress: Progress | None = None,
    ) -> ResendResult:
        """Send already-published outbox rows to Kafka again (a broker or topic was lost)."""
        return await audit.republish(self, selection, reason=reason, wait_s=wait_s,
                                     progress=progress)  # fmt: skip

    async def redrive(
        self, selection: Selection, *, reason: str = "", progress: Progress | None = None
    ) -> ResendResult:
        """Re-send stored handoffs onto their Redis streams (Redis lost recent writes)."""
        return await audit.redrive(self, selection, reason=reason, progress=progress)
