"""One consumer of an agent's group: read -> admit -> handle -> group commit -> publish -> ack.

The stages overlap instead of running batch by batch, so one slow handler (an LLM call of a
minute) never holds back the commit of the others, and reading goes on while Postgres commits:

- the reader keeps up to `concurrency` entries in flight: it reads new entries (XREADGROUP),
  takes over entries of dead consumers (XPENDING IDLE + XCLAIM) and re-runs due retries; a
  reclaimed entry that already failed to complete twice runs alone (agents/isolation.py);
- admission sorts out poison (copied to the DLQ, then acked, in one MULTI), drops entries
  whose idempotency key is already in flight, and looks up keys already committed (a
  redelivery): those re-publish their stored handoffs and are acked; the handler does not
  run again;
- each remaining entry runs its handler as its own task;
- the committer takes every finished handler (up to `batch_size`) and commits them in ONE
  Postgres statement (idempotency, action and outbox rows), then XADDs their handoffs (one
  Lua call, deduplicated by event id), then XACKs them. Under load commits group themselves:
  while one commits, the next group collects.

A crash between any two steps is safe: before the commit nothing is recorded and the entry
is still pending; after it the redelivery finds the idempotency row and only re-sends what
is stored (ARCHITECTURE.md has the table).

What a failed entry becomes (a retry or a DLQ record) is decided in agents/failures.py. The
loop gets what it needs from its process as one `ConsumerDeps` (agents/consumer_deps.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from agentmesh.agents.agent import HandlerSpec
from agentmesh.agents.consumer_deps import ConsumerDeps
from agentmesh.agents.context import Context, runtime_envelope
from agentmesh.agents.decisions import refused_key, run_guarded
from agentmesh.agents.failures import Failures, HandlerTimeout, NoHandler, TooManyDeliveries
from agentmesh.agents.isolation import process_gate, reclaim, run_alone
from agentmesh.agents.oversize import oversize
from agentmesh.agents.session_metrics import observe_session_ends
from agentmesh.bus.deadletter import DeadLetter
from agentmesh.bus.entry import Outgoing, StreamEntry
from agentmesh.bus.streams import Streams
from agentmesh.outbox.unit_of_work import CommitResult, UnitOfWork, Work
from agentmesh.process import faults
from agentmesh.schemas.audit import ACTION
from agentmesh.schemas.errors import PoisonMessage
from agentmesh.schemas.registry import Decoded

log = structlog.get_logger("agentmesh.consumer")


@dataclass(order=True)
class _Retry:
    due: float
    seq: int
    entry: StreamEntry = field(compare=False)
    count: bool = field(compare=False)  # False: parked (breaker open, key in flight), uncounted


@dataclass
class _Done:
    """A finished handler run, waiting for the committer."""

    entry: StreamEntry
    key: str
    outcome: Work | Exception

    @property
    def record_key(self) -> str:
        """The key its action is committed under (a refused decision has its own)."""
        return self.outcome.idempotency_key if isinstance(self.outcome, Work) else self.key


class ConsumerLoop:
    def __init__(self, deps: ConsumerDeps, name: str) -> None:
        self.deps = deps
        self.name = name
        s = deps.settings
        self.streams = Streams(
            deps.redis,
            group=deps.agent.name,
            consumer=name,
            dedup_ttl_s=s.dedup_ttl_s,
            dlq_stream=s.dlq_stream,
        )
        self.uow = UnitOfWork(deps.pool, deps.agent.name)
        self.failures = Failures(
            streams=self.streams,
            settings=s,
            metrics=deps.metrics,
            agent=deps.agent.name,
            schedule=self._schedule,
        )
        self.retries: list[_Retry] = []
        self._seq = itertools.count()
        self._latency_children: dict[str, Any] = {}
        self.gate = process_gate()  # shared by the process's loops: a suspect runs alone
        self.gate.join(self)
        self._reset()

    def _reset(self) -> None:
        """Forget everything in flight (after an error): those entries stay pending in Redis
        and are reclaimed after `claim_idle_ms`, since nobody touches them any more."""
        self.inflight: dict[tuple[str, str], StreamEntry] = {}  # admitted, not yet settled
        self.inflight_keys: set[str] = set()
        self.done: asyncio.Queue[_Done] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.slot_freed = asyncio.Event()

    # -- the two halves -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """The reader and the committer, side by side. If the committer fails, the reader
        stops at its next turn (a blocking XREADGROUP returns within `block_ms`) rather than
        being cancelled: a cancel delivered into redis-py's read of a connection whose server
        just died was seen to leave the task stuck, cancelling, forever."""
        commit = asyncio.create_task(self._commit_loop(stop))
        try:
            await self._read_loop(stop, commit)
            await commit  # raises the committer's error, if that is what ended the reader
        finally:
            if not commit.done():
                commit.cancel()
                await asyncio.gather(commit, return_exceptions=True)
            for t in self.tasks:
                t.cancel()
            self._reset()

    async def _read_loop(self, stop: asyncio.Event, commit: asyncio.Task[None]) -> None:
        s = self.deps.settings
        claim_every = max(s.claim_idle_ms / 2000, 0.2)
        next_claim = 0.0
        while not stop.is_set() and not commit.done():
            if self.gate.closed_to(self):  # another loop of this process runs a suspect alone
                await asyncio.sleep(0.05)
                continue
            free = s.concurrency - len(self.inflight)
            if free <= 0:
                await self._slot_freed(0.5)
                continue
            limit = min(free, s.batch_size)
            batch = await self._due_retries(limit)
            suspects: list[tuple[str, str]] = []
            if not batch and time.monotonic() >= next_claim:
                next_claim = time.monotonic() + claim_every
                batch, suspects = await self._reclaim(limit)
            fresh = False
            if not batch and not suspects:
                wait = min(claim_every, self._time_to_next_retry())
                batch = await self._read_new(wait, limit)
                fresh = True
            if batch:
                await self.admit(batch, fresh=fresh)
            if suspects:
                give_up = lambda: stop.is_set() or commit.done()  # noqa: E731
                await run_alone(suspects, self, claim_idle_ms=s.claim_idle_ms, give_up=give_up)

    async def _slot_freed(self, wait_s: float) -> None:
        self.slot_freed.clear()
        try:
            async with asyncio.timeout(wait_s):
                await self.slot_freed.wait()
        except TimeoutError:
            pass

    def in_flight(self) -> int:
        return len(self.inflight)

    async def _commit_loop(self, stop: asyncio.Event) -> None:
        batch_size = self.deps.settings.batch_size
        while not (stop.is_set() and not self.inflight):
            try:
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for(queue.get()) can take
                # an item off the queue and drop it when its timeout races the get, and a
                # dropped result is an entry that never commits (kept claimed forever).
                async with asyncio.timeout(0.25):
                    first = await self.done.get()
            except TimeoutError:
                continue
            group = [first]
            while len(group) < batch_size and not self.done.empty():
                group.append(self.done.get_nowait())
            await self._settle(group)

    # -- reading ------------------------------------------------------------------------------
    async def _read_new(self, max_wait_s: float, limit: int) -> list[StreamEntry]:
        s = self.deps.settings
        normal, probe = self.deps.stream_modes()
        batch: list[StreamEntry] = []
        if probe:  # a breaker's reset timeout passed: let one entry through as the probe
            batch = await self.streams.read(probe, count=1, block_ms=None)
        if normal:
            block = None if batch else max(1, min(s.block_ms, int(max_wait_s * 1000)))
            batch += await self.streams.read(normal, count=limit, block_ms=block)
        elif not batch:
            await asyncio.sleep(min(0.2, max_wait_s))
        return batch

    def _time_to_next_retry(self) -> float:
        if not self.retries:
            return 3600.0
        return max(0.0, self.retries[0].due - time.monotonic())

    async def _due_retries(self, limit: int) -> list[StreamEntry]:
        now = time.monotonic()
        due: list[_Retry] = []
        while self.retries and self.retries[0].due <= now and len(due) < limit:
            due.append(heapq.heappop(self.retries))
        if not due:
            return []
        paused, _ = self.deps.paused_streams()
        out: list[StreamEntry] = []
        for (stream, count), group in itertools.groupby(
            sorted(due, key=lambda r: (r.entry.stream, r.count)),
            key=lambda r: (r.entry.stream, r.count),
        ):
            items = list(group)
            if not count and stream in paused:  # breaker still open: stay parked
                for r in items:
                    self._schedule(r.entry, delay=0.5, count=False)
                continue
            owned = await self.streams.claim_own(stream, [r.entry.id for r in items], count=count)
            for r in items:
                if r.entry.id in owned:
                    r.entry.deliveries = owned[r.entry.id]
                    out.append(r.entry)
        return out

    async def _reclaim(self, limit: int) -> tuple[list[StreamEntry], list[tuple[str, str]]]:
        """Entries of dead or stalled consumers: (claimed, to run as a batch; suspects, to
        run alone, not claimed yet). The rule is in agents/isolation.py."""
        mine = set(self.inflight) | {(r.entry.stream, r.entry.id) for r in self.retries}
        paused, _ = self.deps.paused_streams()
        streams = [x for x in self.deps.agent.streams if x not in paused]
        out, suspects = await reclaim(
            self.streams, streams, mine=mine, settings=self.deps.settings, limit=limit
        )
        if out or suspects:
            log.info("reclaimed", consumer=self.name, entries=len(out), suspects=len(suspects))
        return out, suspects

    def _schedule(self, entry: StreamEntry, *, delay: float, count: bool) -> None:
        heapq.heappush(
            self.retries, _Retry(time.monotonic() + delay, next(self._seq), entry, count)
        )

    # -- admission ----------------------------------------------------------------------------
    async def admit(self, batch: Sequence[StreamEntry], *, fresh: bool = False) -> None:
        """`fresh`: the batch is new entries from XREADGROUP (first deliveries)."""
        agent, s = self.deps.agent, self.deps.settings
        dead: list[DeadLetter] = []
        ready: list[tuple[StreamEntry, Decoded, HandlerSpec]] = []
        keys: set[str] = set()
        for e in batch:  # whatever goes wrong with one entry is that entry's, not the batch's
            try:
                if too_big := oversize(e, s.max_envelope_bytes):  # before anything parses it
                    dead.append(self.failures.letter(*too_big, "oversize", with_tb=False))
                    continue
                if e.deliveries > s.max_deliveries:
                    raise TooManyDeliveries(
                        f"delivered {e.deliveries} times (max {s.max_deliveries}) without "
                        "completing; its consumers crashed or timed out"
                    )
                decoded = agent.registry.decode(e.raw)
                spec = agent.handlers.get(decoded.envelope.type)
                if spec is None:
                    raise NoHandler(
                        f"agent {agent.name!r} has no handler for {decoded.envelope.type!r}"
                    )
                key = decoded.envelope.idempotency_key
                if key in keys or key in self.inflight_keys:
                    # the same work is already running here: look again once it has settled
                    self._schedule(e, delay=s.retry_initial_s, count=False)
                    continue
                keys.add(key)
                ready.append((e, decoded, spec))
            except PoisonMessage as exc:
                dead.append(self.failures.letter(e, exc, exc.reason, with_tb=False))
            except TooManyDeliveries as exc:
                dead.append(self.failures.letter(e, exc, "max_deliveries", with_tb=False))
            except Exception as exc:  # a bug, or input nobody foresaw: dead-letter, go on
                dead.append(self.failures.letter(e, exc, "decode_error"))
        await self.failures.dead_letter(dead)

        # redeliveries of work already committed: re-send what is stored, do not run again.
        # A first delivery of an event's first copy on its stream cannot have been committed
        # (nothing else carried that idempotency key): it skips the Postgres look-up.
        first = await self._first_copies(ready) if fresh else set()
        try:
            stored = await self.uow.stored_handoffs(
                [d.envelope.idempotency_key for e, d, _ in ready if (e.stream, e.id) not in first]
            )
        except Exception as exc:  # Postgres unavailable: keep the entries (uncounted), back off
            log.error("redelivery look-up failed; parking entries", error=_describe(exc))
            for e, _, _ in ready:
                self._schedule(e, delay=1.0, count=False)
            await asyncio.sleep(0.5)
            return
        if stored:
            await self.streams.publish([o for handoffs in stored.values() for o in handoffs])
            await self.streams.ack([e for e, d, _ in ready if d.envelope.idempotency_key in stored])
            self.deps.metrics.duplicates.labels(agent.name).inc(len(stored))
        closed = self.gate.closed_to(self)  # no await from here on: the gate cannot change
        for e, d, spec in ready:
            key = d.envelope.idempotency_key
            if key in stored:
                continue
            if closed:  # read just as another loop began to run a suspect alone: wait
                self._schedule(e, delay=0.2, count=False)
                continue
            self.inflight[(e.stream, e.id)] = e
            self.inflight_keys.add(key)
            task = asyncio.create_task(self._handle(e, d, spec))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _first_copies(
        self, ready: Sequence[tuple[StreamEntry, Decoded, HandlerSpec]]
    ) -> set[tuple[str, str]]:
        """Entries whose work cannot be committed yet: delivered once, their idempotency key
        is their event id, and they are the first copy of that event on their stream
        (Streams.first_copies). Any other entry is looked up in Postgres, and so is every
        entry whose handler declares `needs` (it calls the outside world: a round trip saved
        is noise next to that call, and such a handler keeps the stronger promise of never
        running again for a copy whose work is committed)."""
        return await self.streams.first_copies(
            [
                (e, d.envelope.event_id)
                for e, d, spec in ready
                if e.deliveries == 1
                and not spec.needs
                and d.envelope.idempotency_key == d.envelope.event_id
            ]
        )

    # -- handling -----------------------------------------------------------------------------
    async def _handle(self, entry: StreamEntry, decoded: Decoded, spec: HandlerSpec) -> None:
        try:
            outcome = await self._run_handler(entry, decoded, spec)
        except Exception as exc:  # e.g. a result that cannot be recorded: a failed run, not
            outcome = exc  # a task that dies and leaves its entry in flight, claimed forever
        self.done.put_nowait(_Done(entry, decoded.envelope.idempotency_key, outcome))

    async def _run_handler(
        self, entry: StreamEntry, decoded: Decoded, spec: HandlerSpec
    ) -> Work | Exception:
        deps = self.deps
        env = decoded.envelope
        ctx = Context(
            agent=deps.agent.name,
            envelope=env,
            registry=deps.agent.registry,
            emits=deps.agent.emits,
            dependencies=deps.dependencies,
            deliveries=entry.deliveries,
            pool=deps.pool,
        )
        limit = spec.timeout_s or deps.settings.handler_timeout_s
        started = time.perf_counter()
        # One timer handle per run, a lighter way to asyncio.timeout's limit (which showed at
        # ~5% of an agent's CPU in a profile); `expired` tells its cancel from a shutdown's.
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if task is not None:
                task.cancel()

        timer = asyncio.get_running_loop().call_later(limit, expire)
        try:
            result: Any = await run_guarded(spec.fn, decoded.payload, ctx)
        except asyncio.CancelledError:
            if not expired or task is None:
                raise
            task.uncancel()
            return HandlerTimeout(f"handler ran longer than {limit:g} s and was cancelled")
        except Exception as exc:
            return exc
        finally:
            timer.cancel()
            self._latency(env.type).observe(time.perf_counter() - started)
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json")
        # the ActionRecorded payload, built as its model would dump it (not validated again:
        # every part is the runtime's own, the result made JSON-safe the same way)
        action = {
            "agent": deps.agent.name,
            "input_event_id": env.event_id,
            "input_type": env.type,
            "result": None if result is None else to_jsonable_python(result),
            "emitted": [e.event_id for e in ctx.recorded] + [e.event_id for _, e in ctx.emitted],
        }
        registry = deps.agent.registry
        audit = runtime_envelope(
            registry,
            ACTION,
            registry.get(ACTION).version,
            action,
            session_id=env.session_id,
            causation_id=env.event_id,
            source=deps.agent.name,
        )
        return Work(
            idempotency_key=refused_key(env) if ctx.refused else env.idempotency_key,
            input=env,
            stream=entry.stream,
            entry_id=entry.id,
            result=result,
            audit=[audit, *ctx.recorded],
            handoffs=ctx.emitted,
        )

    def _latency(self, event_type: str) -> Any:
        child = self._latency_children.get(event_type)
        if child is None:
            child = self.deps.metrics.handler_seconds.labels(self.deps.agent.name, event_type)
            self._latency_children[event_type] = child
        return child

    # -- settling: commit, publish, ack -------------------------------------------------------
    async def _settle(self, group: Sequence[_Done]) -> None:
        m, name = self.deps.metrics, self.deps.agent.name
        m.batch_size.labels(name).observe(len(group))
        try:
            works = [d.outcome for d in group if isinstance(d.outcome, Work)]
            failures = [(d.entry, d.outcome) for d in group if isinstance(d.outcome, Exception)]
            result = await self._commit(works)
            faults.point("after_commit")
            outgoing: list[Outgoing] = [o for w in result.committed for o in w.outgoing()]
            outgoing += [o for handoffs in result.duplicates.values() for o in handoffs]
            await self.streams.publish(outgoing)
            faults.point("after_publish")
            ok = {w.idempotency_key for w in result.committed} | set(result.duplicates)
            await self.streams.ack([d.entry for d in group if d.record_key in ok])
            for etype, n in Counter(w.input.type for w in result.committed).items():
                m.processed.labels(name, etype).inc(n)
            if result.duplicates:
                m.duplicates.labels(name).inc(len(result.duplicates))
            by_key = {d.record_key: d.entry for d in group}
            failures += [(by_key[w.idempotency_key], exc) for w, exc in result.failed]
            await self.failures.failed(failures)
            await observe_session_ends(self.deps.pool, m, name, result.committed)
        finally:
            for d in group:
                self.inflight.pop((d.entry.stream, d.entry.id), None)
                self.inflight_keys.discard(d.key)
            self.slot_freed.set()
            self.gate.settled()

    async def _commit(self, works: Sequence[Work]) -> CommitResult:
        """Commit, waiting out a Postgres outage: the handlers' results are kept and their
        entries stay claimed (the heartbeat goes on), so an outage neither re-runs handlers
        nor burns deliveries. Only a stop request gives up (the entries stay pending)."""
        delay = 0.2
        while True:
            try:
                return await self.uow.commit(works)
            except Exception as exc:
                if self.deps.stop_event.is_set():
                    raise
                log.error("commit failed; retrying", error=_describe(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- keeping claims -----------------------------------------------------------------------
    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Touch in-flight and parked entries well before `claim_idle_ms`, so a long handler
        (an LLM call of minutes) is not reclaimed and run a second time mid-way."""
        interval = max(self.deps.settings.claim_idle_ms / 3000, 0.05)
        next_beat = time.monotonic() + interval
        # beat on through SIGTERM's grace period while handlers are still in flight
        while not (stop.is_set() and not self.inflight):
            await asyncio.sleep(min(interval, 0.25))
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + interval
            by_stream: dict[str, list[str]] = {}
            for stream, entry_id in list(self.inflight):
                by_stream.setdefault(stream, []).append(entry_id)
            for rt in self.retries:
                by_stream.setdefault(rt.entry.stream, []).append(rt.entry.id)
            for stream, ids in by_stream.items():
                try:
                    owned = await self.streams.claim_own(stream, ids, count=False)
                except Exception as exc:  # keep beating; the loop reports Redis errors
                    log.warning("heartbeat failed", error=str(exc))
                    continue
                lost = set(ids) - set(owned)
                if lost:
                    log.warning("claims lost to another consumer", stream=stream, n=len(lost))
                    self.retries = [x for x in self.retries if x.entry.id not in lost]
                    heapq.heapify(self.retries)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
