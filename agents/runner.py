"""Running one agent type: the consume -> handle -> commit -> publish -> ack loop.

One batch goes through these steps (ARCHITECTURE.md draws them):

1. read: XREADGROUP (new entries), XAUTOCLAIM (entries of dead consumers) or due retries;
2. sort out poison (bad JSON, unknown type, newer schema, oversize, too many deliveries)
   and copy it to the DLQ, then ack it (one MULTI);
3. drop in-batch duplicates, and look up keys already committed (a redelivery): those only
   re-publish their stored handoffs and are acked, the handler does not run again;
4. run the handlers concurrently (bounded);
5. commit every result in ONE Postgres statement: idempotency rows, action rows, outbox rows;
6. XADD the handoffs (one Lua call, deduplicated by event id), then XACK the batch.

A crash between any two steps is safe: before 5 nothing is recorded and the entry is still
pending; after 5 the redelivery finds the idempotency row and only re-sends what is stored.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import random
import secrets
import signal
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aiobreaker import CircuitBreakerError
from pydantic import BaseModel
from redis.asyncio import Redis

from agentmesh.settings import Settings
from agents import faults
from agents.agent import Agent, HandlerSpec
from agents.context import Context
from agents.health import HealthServer
from agents.metrics import Metrics
from agents.resilience import STATE_VALUE, Dependency, NonRetryable
from bus.deadletter import DeadLetter
from bus.entry import Outgoing, StreamEntry
from bus.streams import Streams
from outbox.unit_of_work import UnitOfWork, Work
from schemas.audit import ACTION, ActionRecorded
from schemas.errors import PoisonMessage
from schemas.registry import Decoded

log = structlog.get_logger("agentmesh.runner")


class NoHandler(PoisonMessage):
    reason = "no_handler"


class TooManyDeliveries(Exception):
    pass


class HandlerTimeout(Exception):
    """A handler exceeded its time limit; retried like any failure, then dead-lettered."""


@dataclass(order=True)
class _Retry:
    due: float
    seq: int
    entry: StreamEntry = field(compare=False)
    count: bool = field(compare=False)  # False: parked behind an open breaker, not a failure


class ConsumerLoop:
    """One consumer of the agent's group: reads, processes and acks batches in turn."""

    def __init__(self, runner: Runner, name: str) -> None:
        self.runner = runner
        self.name = name
        s = runner.settings
        self.streams = Streams(
            runner.redis,
            group=runner.agent.name,
            consumer=name,
            dedup_ttl_s=s.dedup_ttl_s,
            dlq_stream=s.dlq_stream,
        )
        self.uow = UnitOfWork(runner.pool, runner.agent.name)
        self.sem = asyncio.Semaphore(s.concurrency)
        self.retries: list[_Retry] = []
        self.inflight: dict[tuple[str, str], StreamEntry] = {}
        self._seq = itertools.count()
        self._latency_children: dict[str, Any] = {}

    # -- the loop -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        s = self.runner.settings
        claim_every = max(s.claim_idle_ms / 2000, 0.2)
        next_claim = 0.0
        while not stop.is_set():
            batch = await self._due_retries()
            if not batch and time.monotonic() >= next_claim:
                next_claim = time.monotonic() + claim_every
                batch = await self._reclaim()
            if not batch:
                batch = await self._read_new(min(claim_every, self._time_to_next_retry()))
            if batch:
                await self.process(batch)

    async def _read_new(self, max_wait_s: float) -> list[StreamEntry]:
        s = self.runner.settings
        normal, probe = self.runner.stream_modes()
        batch: list[StreamEntry] = []
        if probe:  # a breaker's reset timeout passed: let one entry through as the probe
            batch = await self.streams.read(probe, count=1, block_ms=None)
        if normal:
            block = None if batch else max(1, min(s.block_ms, int(max_wait_s * 1000)))
            batch += await self.streams.read(normal, count=s.batch_size, block_ms=block)
        elif not batch:
            await asyncio.sleep(min(0.2, max_wait_s))
        return batch

    def _time_to_next_retry(self) -> float:
        if not self.retries:
            return 3600.0
        return max(0.0, self.retries[0].due - time.monotonic())

    async def _due_retries(self) -> list[StreamEntry]:
        now = time.monotonic()
        due: list[_Retry] = []
        while self.retries and self.retries[0].due <= now:
            due.append(heapq.heappop(self.retries))
        if not due:
            return []
        paused, _ = self.runner.paused_streams()
        out: list[StreamEntry] = []
        for key, group in itertools.groupby(
            sorted(due, key=lambda r: (r.entry.stream, r.count)),
            key=lambda r: (r.entry.stream, r.count),
        ):
            stream, count = key
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

    async def _reclaim(self) -> list[StreamEntry]:
        s = self.runner.settings
        mine = {k for k in self.inflight} | {(r.entry.stream, r.entry.id) for r in self.retries}
        out: list[StreamEntry] = []
        paused, _ = self.runner.paused_streams()
        for stream in self.runner.agent.streams:
            if stream in paused:
                continue
            claimed = await self.streams.autoclaim(
                stream, min_idle_ms=s.claim_idle_ms, count=s.batch_size
            )
            out += [e for e in claimed if (e.stream, e.id) not in mine]
        if out:
            log.info("reclaimed", consumer=self.name, entries=len(out))
        return out

    def _schedule(self, entry: StreamEntry, *, delay: float, count: bool) -> None:
        heapq.heappush(
            self.retries, _Retry(time.monotonic() + delay, next(self._seq), entry, count)
        )

    # -- one batch ------------------------------------------------------------------------
    async def process(self, batch: Sequence[StreamEntry]) -> None:
        r = self.runner
        agent, s, m = r.agent, r.settings, r.metrics
        m.batch_size.labels(agent.name).observe(len(batch))
        dead: list[DeadLetter] = []
        ready: list[tuple[StreamEntry, Decoded, HandlerSpec]] = []
        followers: list[tuple[StreamEntry, str]] = []  # same key as an earlier entry
        leaders: dict[str, StreamEntry] = {}
        for e in batch:
            try:
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
            except PoisonMessage as exc:
                dead.append(self._letter(e, exc, exc.reason, with_tb=False))
                continue
            except TooManyDeliveries as exc:
                dead.append(self._letter(e, exc, "max_deliveries", with_tb=False))
                continue
            key = decoded.envelope.idempotency_key
            if key in leaders:
                followers.append((e, key))
                continue
            leaders[key] = e
            ready.append((e, decoded, spec))
        await self._dead_letter(dead)

        # redeliveries of work already committed: re-send what is stored, do not run again
        stored = await self.uow.stored_handoffs([d.envelope.idempotency_key for _, d, _ in ready])
        done_keys = set(stored)
        todo = [t for t in ready if t[1].envelope.idempotency_key not in done_keys]
        for e, _, _ in todo:
            self.inflight[(e.stream, e.id)] = e
        try:
            outcomes = await asyncio.gather(*(self._run(e, d, h) for e, d, h in todo))
        finally:
            for e, _, _ in todo:
                self.inflight.pop((e.stream, e.id), None)
        works = [o for o in outcomes if isinstance(o, Work)]
        failures = [
            (t[0], o) for t, o in zip(todo, outcomes, strict=True) if isinstance(o, Exception)
        ]

        result = await self.uow.commit(works)
        faults.point("after_commit")
        stored.update(result.duplicates)
        done_keys |= set(result.duplicates)
        outgoing: list[Outgoing] = [o for w in result.committed for o in w.outgoing()]
        outgoing += [o for handoffs in stored.values() for o in handoffs]
        await self.streams.publish(outgoing)
        faults.point("after_publish")

        ok_keys = done_keys | {w.idempotency_key for w in result.committed}
        to_ack = [e for e, d, _ in ready if d.envelope.idempotency_key in ok_keys]
        to_ack += [e for e, k in followers if k in ok_keys]
        await self.streams.ack(to_ack)

        for etype, n in Counter(w.input.type for w in result.committed).items():
            m.processed.labels(agent.name, etype).inc(n)
        if done_keys:
            m.duplicates.labels(agent.name).inc(len(done_keys))
        for w, commit_error in result.failed:
            failures.append((leaders[w.idempotency_key], commit_error))
        for e, k in followers:
            if k not in ok_keys:
                self._schedule(e, delay=s.retry_initial_s, count=True)
        if failures:
            await self._failed(failures)

    async def _run(
        self, entry: StreamEntry, decoded: Decoded, spec: HandlerSpec
    ) -> Work | Exception:
        r = self.runner
        env = decoded.envelope
        async with self.sem:
            ctx = Context(
                agent=r.agent.name,
                envelope=env,
                registry=r.agent.registry,
                emits=r.agent.emits,
                dependencies=r.dependencies,
                deliveries=entry.deliveries,
            )
            started = time.perf_counter()
            try:
                async with asyncio.timeout(spec.timeout_s or r.settings.handler_timeout_s):
                    result: Any = await spec.fn(decoded.payload, ctx)
            except TimeoutError:
                limit = spec.timeout_s or r.settings.handler_timeout_s
                return HandlerTimeout(f"handler ran longer than {limit:g} s and was cancelled")
            except Exception as exc:
                return exc
            finally:
                self._latency(env.type).observe(time.perf_counter() - started)
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json")
        audit = r.agent.registry.make(
            ACTION,
            ActionRecorded(
                agent=r.agent.name,
                input_event_id=env.event_id,
                input_type=env.type,
                result=result,
                emitted=[e.event_id for _, e in ctx.emitted],
            ),
            session_id=env.session_id,
            causation_id=env.event_id,
            source=r.agent.name,
        )
        return Work(
            idempotency_key=env.idempotency_key,
            input=env,
            stream=entry.stream,
            entry_id=entry.id,
            result=result,
            audit=[audit],
            handoffs=ctx.emitted,
        )

    def _latency(self, event_type: str) -> Any:
        child = self._latency_children.get(event_type)
        if child is None:
            child = self.runner.metrics.handler_seconds.labels(self.runner.agent.name, event_type)
            self._latency_children[event_type] = child
        return child

    async def _failed(self, failures: Sequence[tuple[StreamEntry, Exception]]) -> None:
        r = self.runner
        s, m, name = r.settings, r.metrics, r.agent.name
        dead: list[DeadLetter] = []
        counted = [(e, x) for e, x in failures if not isinstance(x, CircuitBreakerError)]
        await self.streams.record_failures([(e, f"{type(x).__name__}: {x}") for e, x in counted])
        for e, exc in failures:
            if isinstance(exc, CircuitBreakerError):  # not the message's fault: wait, uncounted
                self._schedule(e, delay=0.5, count=False)
                continue
            etype = _type_of(e)
            m.failed.labels(name, etype).inc()
            if isinstance(exc, NonRetryable):
                dead.append(self._letter(e, exc, "non_retryable"))
            elif e.deliveries >= s.max_deliveries:
                dead.append(self._letter(e, exc, "max_deliveries"))
            else:
                delay = min(s.retry_initial_s * 2 ** (e.deliveries - 1), s.retry_max_s)
                self._schedule(e, delay=delay * random.uniform(0.8, 1.2), count=True)
                m.retried.labels(name, etype).inc()
                log.info(
                    "handler failed, will retry", id=e.id, deliveries=e.deliveries, error=str(exc)
                )
        await self._dead_letter(dead)

    async def _dead_letter(self, dead: Sequence[DeadLetter]) -> None:
        if not dead:
            return
        await self.streams.dead_letter(dead)
        for d in dead:
            self.runner.metrics.dead_lettered.labels(self.runner.agent.name, d.reason).inc()
            log.warning(
                "dead-lettered",
                stream=d.entry.stream,
                id=d.entry.id,
                reason=d.reason,
                error=d.error,
            )

    def _letter(
        self, e: StreamEntry, exc: BaseException, reason: str, *, with_tb: bool = True
    ) -> DeadLetter:
        return DeadLetter.from_exception(
            e,
            exc,
            reason=reason,
            group=self.runner.agent.name,
            agent=self.runner.agent.name,
            with_traceback=with_tb,
        )

    # -- keeping claims -------------------------------------------------------------------
    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Touch in-flight and parked entries well before `claim_idle_ms`, so a long handler
        (an LLM call of minutes) is not reclaimed and run a second time mid-way."""
        interval = max(self.runner.settings.claim_idle_ms / 3000, 0.05)
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
                    log.warning(
                        "claims lost to another consumer", stream=stream, ids=sorted(lost)[:5]
                    )
                    self.retries = [x for x in self.retries if x.entry.id not in lost]
                    heapq.heapify(self.retries)


def _type_of(e: StreamEntry) -> str:
    try:
        return str(json.loads(e.raw).get("type", "?"))
    except Exception:
        return "?"


class Runner:
    """One agent process: N consumer loops, a heartbeat each, a trimmer, stats and /metrics."""

    def __init__(self, agent: Agent, settings: Settings) -> None:
        self.agent = agent
        self.settings = settings
        self.metrics = Metrics()
        self.dependencies = {n: Dependency(spec) for n, spec in agent.dependencies.items()}
        self.stop_event = asyncio.Event()
        self.redis: Redis
        self.pool: asyncpg.Pool
        self.loops: list[ConsumerLoop] = []
        self.http: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = False
        base = f"{agent.name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.consumer_names = [f"{base}-{i}" for i in range(settings.consumers)]

    # -- breakers decide which streams are read ---------------------------------------------
    def paused_streams(self) -> tuple[set[str], set[str]]:
        """(paused, probing): streams whose handlers need an open breaker, or one due a probe."""
        paused: set[str] = set()
        probing: set[str] = set()
        for stream in self.agent.streams:
            states = {self.dependencies[d].state for d in self.agent.needs_of_stream(stream)}
            if "open" in states:
                paused.add(stream)
            elif "half-open" in states:
                probing.add(stream)
        return paused, probing

    def stream_modes(self) -> tuple[list[str], list[str]]:
        paused, probing = self.paused_streams()
        normal = [s for s in self.agent.streams if s not in paused and s not in probing]
        return normal, sorted(probing)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if not self.agent.handlers:
            raise ValueError(f"agent {self.agent.name!r} has no handlers")
        self.redis = Redis.from_url(s.redis_url, decode_responses=False)
        self.pool = await asyncpg.create_pool(s.postgres_dsn, min_size=1, max_size=s.pg_pool_size)
        self.loops = [ConsumerLoop(self, n) for n in self.consumer_names]
        for stream in self.agent.streams:
            await self.loops[0].streams.ensure_group(stream)
        self.http = HealthServer(
            host=s.http_host,
            port=s.http_port,
            metrics=self.metrics.registry,
            live=self._live,
            ready=self._readyz,
        )
        port = await self.http.start()
        for lp in self.loops:
            self._tasks.append(asyncio.create_task(self._guard(lp.run, lp.name)))
            self._tasks.append(asyncio.create_task(self._guard(lp.heartbeat, lp.name + "/hb")))
        self._tasks.append(asyncio.create_task(self._guard(self._housekeeping, "housekeeping")))
        self._ready = True
        log.info(
            "agent started",
            agent=self.agent.name,
            streams=self.agent.streams,
            consumers=len(self.loops),
            http_port=port,
        )

    async def _guard(self, fn: Any, name: str) -> None:
        """Run a loop; on an unexpected error (Redis or Postgres down) log, back off, go on."""
        delay = 0.2
        while not self.stop_event.is_set():
            try:
                await fn(self.stop_event)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._ready = False
                log.error("loop error, retrying", loop=name, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.2

    async def stop(self) -> None:
        """Stop reading; give in-flight batches `grace_s` to finish; leave the rest pending."""
        self.stop_event.set()
        self._ready = False
        not_done: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, not_done = await asyncio.wait(self._tasks, timeout=self.settings.grace_s)
        for t in not_done:
            t.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        if self.http:
            await self.http.stop()
        await self.pool.close()
        await self.redis.aclose()
        log.info("agent stopped", agent=self.agent.name, cancelled=len(not_done))

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.stop_event.wait()
        log.info("stopping: finishing in-flight work", grace_s=self.settings.grace_s)
        await self.stop()

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        s = self.settings
        streams = self.loops[0].streams
        next_trim = time.monotonic() + s.trim_interval_s
        while not stop.is_set():
            for stream in self.agent.streams:
                info = await streams.group_info(stream)
                self.metrics.pending.labels(self.agent.name, stream).set(info["pending"])
                self.metrics.lag.labels(self.agent.name, stream).set(info["lag"])
            for name, dep in self.dependencies.items():
                self.metrics.breaker_state.labels(self.agent.name, name).set(STATE_VALUE[dep.state])
            if time.monotonic() >= next_trim:
                next_trim = time.monotonic() + s.trim_interval_s
                for stream in self.agent.streams:
                    await streams.trim(stream, retention_s=s.stream_retention_s)
                    await streams.prune_consumers(stream, idle_ms=s.consumer_idle_prune_ms)
            self._ready = True
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(2.0, s.trim_interval_s))
            except TimeoutError:
                pass

    async def _live(self) -> tuple[bool, str]:
        return True, "ok"

    async def _readyz(self) -> tuple[bool, str]:
        if not self._ready or self.stop_event.is_set():
            return False, "not ready"
        try:
            await asyncio.wait_for(self.redis.ping(), 2)
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), 2)
        except Exception as exc:
            return False, f"dependency unreachable: {type(exc).__name__}"
        paused, _ = self.paused_streams()
        return True, "ready" + (f" (paused: {', '.join(sorted(paused))})" if paused else "")
