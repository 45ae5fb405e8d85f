"""Running one agent type as a process: consumer loops, heartbeats, housekeeping, /metrics.

The work itself (read -> handle -> commit -> publish -> ack) lives in agents/consumer.py;
this module starts it, decides from the breakers which streams may be read, and stops it
gracefully on SIGTERM.

Starting does not need the servers up: /healthz and /readyz answer first, then the runner
waits for PostgreSQL and Redis (agentmesh.process.waiting: what counts as down, what as a
misconfiguration that fails at once), and starts its loops when both answer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentmesh import connect
from agentmesh.agents.agent import Agent
from agentmesh.agents.budget_gate import budget_paused
from agentmesh.agents.consumer import ConsumerLoop
from agentmesh.agents.consumer_deps import ConsumerDeps
from agentmesh.agents.group_gauges import sample_group_gauges
from agentmesh.agents.metrics import Metrics
from agentmesh.agents.periodic import Tick, run_periodic
from agentmesh.agents.resilience import STATE_VALUE, Dependency
from agentmesh.bus.budget import Buckets
from agentmesh.process.health import HealthServer
from agentmesh.process.waiting import Misconfigured, Outages, Server, Waiter, outage_reason
from agentmesh.settings import Settings

BREAKER_REPORT_PREFIX = "mesh:breakers:"  # + replica name: {agent, replica, states}
BREAKER_REPORT_TTL_S = 15

log = structlog.get_logger("agentmesh.runner")


class Runner:
    """One agent process: N consumer loops, a heartbeat each, a trimmer, stats and /metrics."""

    def __init__(self, agent: Agent, settings: Settings) -> None:
        self.agent = agent
        self.settings = settings
        agent.registry.max_bytes = settings.max_envelope_bytes  # what ctx.emit may make
        self.metrics = Metrics()
        self.breakers_changed = asyncio.Event()
        self.dependencies = {
            n: Dependency(spec, on_change=self.breakers_changed.set)
            for n, spec in agent.dependencies.items()
        }
        self.stop_event = asyncio.Event()
        self.redis: Redis
        self.pool: asyncpg.Pool
        self.loops: list[ConsumerLoop] = []
        self.http: HealthServer | None = None
        self.started = False  # True once both servers answered and the loops run
        self.outages = Outages()  # the servers start-up is waiting for (/readyz says which)
        self.servers = (Server.postgres(settings.postgres_dsn), Server.redis(settings.redis_url))
        self._closing: list[Callable[[], Awaitable[None]]] = []  # what stop() closes, in order
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = False
        base = f"{agent.name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.consumer_names = [f"{base}-{i}" for i in range(settings.consumers)]
        self.replica = base

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
        """New entries are read from neither paused streams nor those whose every handler
        needs an empty shared budget (entries parked for it still run when due)."""
        paused, probing = self.paused_streams()
        gated = budget_paused(self.agent, self.dependencies)
        normal = [s for s in self.agent.streams if s not in paused | probing | gated]
        return normal, sorted(probing - gated)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Serve /healthz first, wait until PostgreSQL and Redis answer, then start the loops.

        While a server is down, /readyz says which and why, and the log says so once (then
        at most every 10 s). Returns early, not started, when `stop_event` is set meanwhile
        (SIGTERM). Raises `Misconfigured` (a pydantic ValidationError naming the setting)
        when waiting cannot help: a malformed URL, bad credentials, a missing database."""
        pg_server, redis_server = self.servers
        s = self.settings
        if not self.agent.handlers:
            raise ValueError(f"agent {self.agent.name!r} has no handlers")
        # A socket timeout above the XREADGROUP block time: a command sent on a connection that
        # died with its server (kill -9, a network cut) fails instead of waiting forever.
        try:
            self.redis = connect.redis_client(
                s,
                decode_responses=False,
                socket_timeout=s.block_ms / 1000 + 10,
                socket_connect_timeout=5,
            )
        except ValueError as exc:
            raise Misconfigured.of(redis_server, str(exc)) from exc
        self._closing.append(self.redis.aclose)
        buckets = Buckets(self.redis)
        for dep in self.dependencies.values():
            dep.attach(buckets)
        self.metrics.watch_budgets(self.agent.name, self.dependencies)
        self.http = HealthServer(
            host=s.http_host,
            port=s.http_port,
            metrics=self.metrics.registry,
            live=self._live,
            ready=self._readyz,
        )
        port = await self.http.start()
        self._closing.insert(0, self.http.stop)
        log.info("agent starting", agent=self.agent.name, http_port=port)
        wait = Waiter(self.stop_event, log, self.outages, servers=self.servers)
        pool = await wait.until_up(pg_server, self._create_pool)
        if pool is None:
            return  # stopped while waiting
        self.pool = pool
        self._closing.append(pool.close)
        deps = self._consumer_deps()
        self.loops = [ConsumerLoop(deps, n) for n in self.consumer_names]
        if not await wait.until_up(redis_server, self._prepare_streams):
            return
        for lp in self.loops:
            self._tasks.append(asyncio.create_task(self._guard(lp.run, lp.name)))
            self._tasks.append(asyncio.create_task(self._guard(lp.heartbeat, lp.name + "/hb")))
        self._tasks.append(asyncio.create_task(self._guard(self._housekeeping, "housekeeping")))
        if self.dependencies:
            self._tasks.append(asyncio.create_task(self._guard(self._breaker_reports, "breakers")))
        tick = Tick(agent=self.agent.name, pool=self.pool, bus=self.loops[0].streams)
        for spec in self.agent.periodic:
            job = functools.partial(run_periodic, spec, tick)
            self._tasks.append(asyncio.create_task(self._guard(job, f"every/{spec.name}")))
        self._ready = self.started = True
        log.info(
            "agent started",
            agent=self.agent.name,
            streams=self.agent.streams,
            consumers=len(self.loops),
            http_port=port,
        )

    async def _create_pool(self) -> asyncpg.Pool:
        s = self.settings
        pool: asyncpg.Pool = await connect.pg_pool(s, min_size=1, max_size=s.pg_pool_size)
        return pool

    async def _prepare_streams(self) -> bool:
        """Redis answers, and every stream this agent reads has its consumer group."""
        await self.redis.ping()
        for stream in self.agent.streams:
            await self.loops[0].streams.ensure_group(stream)
        return True

    def _consumer_deps(self) -> ConsumerDeps:
        """What the consumer loops use of this process (once Redis and Postgres are up)."""
        return ConsumerDeps(
            settings=self.settings,
            agent=self.agent,
            redis=self.redis,
            pool=self.pool,
            metrics=self.metrics,
            dependencies=self.dependencies,
            paused_streams=self.paused_streams,
            stream_modes=self.stream_modes,
            stop_event=self.stop_event,
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
        await self._close()
        log.info("agent stopped", agent=self.agent.name, cancelled=len(not_done))

    async def _close(self) -> None:
        """Close what start() opened (the health server first), however far it got."""
        closing, self._closing = self._closing, []
        for close in closing:
            await close()

    async def run_forever(self) -> None:
        """`mesh agent run`: start (waiting for the servers if need be) and run until SIGTERM
        or SIGINT; a signal during the wait ends it at once, cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        try:
            await self.start()
        except BaseException:  # a misconfiguration (one line from the CLI), or a bug
            self.stop_event.set()
            await self._close()
            raise
        await self.stop_event.wait()
        if self.started:
            log.info("stopping: finishing in-flight work", grace_s=self.settings.grace_s)
        await self.stop()

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        s = self.settings
        streams = self.loops[0].streams
        next_trim = time.monotonic() + s.trim_interval_s
        while not stop.is_set():
            await sample_group_gauges(
                streams, self.agent.name, self.agent.streams, self.metrics, s.dlq_stream
            )
            if time.monotonic() >= next_trim:
                next_trim = time.monotonic() + s.trim_interval_s
                for stream in self.agent.streams:
                    await streams.trim(stream, retention_s=s.stream_retention_s)
                    await streams.prune_consumers(stream, idle_ms=s.consumer_idle_prune_ms)
            self._ready = True
            try:
                async with asyncio.timeout(min(2.0, s.trim_interval_s)):
                    await stop.wait()
            except TimeoutError:
                pass

    async def _breaker_reports(self, stop: asyncio.Event) -> None:
        """Breaker states for `mesh status` and /metrics: at once when a breaker changes state,
        else every 2 s (an open breaker turns half-open by the clock, with no event)."""
        counted = dict.fromkeys(self.dependencies, 0)
        while not stop.is_set():
            self.breakers_changed.clear()
            for name, dep in self.dependencies.items():
                self.metrics.breaker_state.labels(self.agent.name, name).set(STATE_VALUE[dep.state])
                opened = dep.opened
                if opened > counted[name]:
                    self.metrics.breaker_opened.labels(self.agent.name, name).inc(
                        opened - counted[name]
                    )
                    counted[name] = opened
            await self._report_breakers()
            changed = asyncio.create_task(self.breakers_changed.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({changed, stopping}, timeout=2.0, return_when="FIRST_COMPLETED")
            for t in (changed, stopping):
                t.cancel()

    async def _report_breakers(self) -> None:
        """One short-lived key per replica, so a replica that died drops out by itself within
        BREAKER_REPORT_TTL_S. It carries each breaker's state and how often it has opened."""
        states = {name: dep.report() for name, dep in self.dependencies.items()}
        report = json.dumps({"agent": self.agent.name, "replica": self.replica, "states": states})
        try:
            await self.redis.set(
                f"{BREAKER_REPORT_PREFIX}{self.replica}", report, ex=BREAKER_REPORT_TTL_S
            )
        except RedisError:
            pass  # Redis down: the consumer loops are already handling that

    async def _live(self) -> tuple[bool, str]:
        return True, "ok"

    async def _readyz(self) -> tuple[bool, str]:
        if self.stop_event.is_set():
            return False, "stopping"
        if not self.started:
            return False, self.outages.describe() or "starting"
        if not self._ready:
            return False, "not ready"
        pg_server, redis_server = self.servers
        for server, check in (
            (redis_server, self.redis.ping),
            (pg_server, functools.partial(self.pool.fetchval, "SELECT 1")),
        ):
            try:
                await asyncio.wait_for(check(), 2)
            except Exception as exc:
                try:
                    reason = outage_reason(server, exc) or f"{type(exc).__name__}: {exc}"
                except Misconfigured as bad:
                    reason = str(bad.errors()[0]["msg"])
                return False, f"{server.name} at {server.address} unreachable: {reason}"
        paused, _ = self.paused_streams()
        paused |= budget_paused(self.agent, self.dependencies)
        return True, "ready" + (f" (paused: {', '.join(sorted(paused))})" if paused else "")


def _dump_tasks() -> None:
    """SIGUSR1: log where every asyncio task waits (a stuck agent, explained)."""
    for task in asyncio.all_tasks():
        frames: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(frames) < 30:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        log.warning("task", name=task.get_name(), cancelling=task.cancelling(), at=frames)
