"""The relay's life: start, run rounds until stopped, close.

`Relay` joins the pieces (slots, Kafka link, round, housekeeping) and owns what ties them
together: the loop that re-shares partitions, backs off through Postgres and Kafka outages
(and tells one from the other), and rebuilds the Kafka clients after a failed round.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import asyncpg
import structlog

from agentmesh import connect
from agentmesh.outbox.relay_housekeeping import Housekeeping
from agentmesh.outbox.relay_kafka import KafkaLink, _describe
from agentmesh.outbox.relay_rounds import RoundPublisher
from agentmesh.outbox.relay_slots import SlotConfigMismatch, SlotOwnership
from agentmesh.process.waiting import Outages, Server, describe, outage_reason

log = structlog.get_logger("agentmesh.relay")


class Relay(RoundPublisher, KafkaLink, SlotOwnership, Housekeeping):
    """One relay process's worth of work. `run(stop)` until `stop` is set; several relays may
    run at once. `drain=True` takes every free slot, and `member=False` keeps the relay out
    of the head count that sets each relay's share (both for one-shot commands)."""

    @functools.cached_property
    def servers(self) -> tuple[Server, Server]:
        """(PostgreSQL, Kafka), as /readyz and the log name them."""
        return Server.postgres(self.s.postgres_dsn), Server.kafka(self.s.kafka_bootstrap)

    @functools.cached_property
    def outages(self) -> Outages:
        """The servers the relay is waiting for now (/readyz says which); their log lines
        come once, then at most every 10 s, however often the rounds retry."""
        return Outages()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.pool = await connect.pg_pool(self.s, min_size=1, max_size=4)
        await self._conn()

    async def prepare(self) -> None:
        """Kafka side: the topic set up, a producer connected, the partitions known."""
        await self._ensure_producer()

    async def close(self) -> None:
        await self.drop_prefetch()
        try:
            await self.settle()
        except Exception as exc:  # Postgres gone: those rows stay unpublished, sent again
            log.warning("relay: the last mark failed; its rows will be sent again", error=str(exc))
        await self._reset_producer()
        try:
            await self.release_all()  # the others take them at once, not after the lease
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # closing the connection below frees them too (the liveness lock goes)
        if self._lease_conn is not None and not self._lease_conn.is_closed():
            await self._lease_conn.close()
        self._lease_conn = None
        self._drop(set(self.owned))
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # -- the loop -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set. Kafka or Postgres outages back off and retry; slots
        are re-shared every `relay_rebalance_interval_s` (sooner while below a fair share).
        Backlog metrics and pruning run beside the rounds, so they stay current while a round
        waits on a broker that is down."""
        housekeeping = asyncio.create_task(self._housekeeping(stop))
        try:
            await self._rounds(stop)
        finally:
            housekeeping.cancel()
            try:
                await housekeeping
            except asyncio.CancelledError:
                pass

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        next_prune = 0.0
        failures = Outages()  # its own: the rounds report the outage itself
        while not stop.is_set():
            try:
                await self.backlog()
                if time.monotonic() >= next_prune and self.s.outbox_retention_s > 0:
                    await self.prune()
                    next_prune = time.monotonic() + self.s.outbox_prune_interval_s
                failures.up(self.servers[0])
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if (o := failures.down(self.servers[0], describe(exc))) is not None:
                    log.warning(
                        "relay: housekeeping failed", error=str(exc), **o.fields(time.monotonic())
                    )
            await _sleep_or_stop(stop, 2.0)

    async def _rounds(self, stop: asyncio.Event) -> None:
        backoff = 0.0
        next_rebalance = 0.0
        next_look = 0.0
        while not stop.is_set():
            now = time.monotonic()
            reached = now >= next_rebalance or bool(self.owned)  # the round asks both servers
            try:
                if now < next_rebalance and now >= next_look:
                    # a relay froze, hung or died: take its partitions within a lease + a round
                    next_look = now + min(0.5, self.s.relay_lease_s / 4)
                    if await self.takeover_due():
                        next_rebalance = now
                if now >= next_rebalance:
                    await self.settle()  # partitions are given back only fully marked
                    await self.rebalance()
                    fast = self.share_missing()
                    next_rebalance = now + (0.5 if fast else self.s.relay_rebalance_interval_s)
                self._wake.clear()
                if self.owned:
                    await self._ensure_producer()
                res = await self.round(pipelined=True)
            except SlotConfigMismatch:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Every Postgres error of a round counts as an outage (a deadlock between
                # relays, a server restarting): the relay retries rather than exits.
                backoff = self._next_backoff(backoff)
                self._down(0, describe(exc), "relay: postgres unavailable",
                           error=str(exc), retry_in=backoff)  # fmt: skip
                await _sleep_or_stop(stop, backoff)
                continue
            except Exception as exc:  # Kafka: start, metadata or topic set-up failed
                self.kafka_ok = False
                self.kafka_failing = True
                backoff = self._next_backoff(backoff)
                await self._reset_producer()
                reason = self._kafka_reason(exc)
                self._down(1, reason, "relay: kafka unavailable",
                           error=_describe(exc), retry_in=backoff)  # fmt: skip
                await _sleep_or_stop(stop, backoff)
                continue
            if res.failed_partitions:
                self.kafka_ok = False
                self.kafka_failing = True
                backoff = self._next_backoff(backoff)
                error = next(iter(res.failed_partitions.values()))
                self._down(1, f"no ack: {error}", "relay: kafka did not ack",
                           published=res.published, partitions=sorted(res.failed_partitions),
                           error=error, retry_in=backoff)  # fmt: skip
                # A new producer (and partition probe) for the next round: the broker may come
                # back as a new process, and the topic may have to be set up again.
                await self._reset_producer()
                await _sleep_or_stop(stop, backoff)
                continue
            self.kafka_ok = self._producer is not None or self.kafka_ok
            if self._producer is not None:
                self.kafka_failing = False
            if res.fenced:
                continue  # a lease ran out mid-round: the next round renews or drops it
            if reached:
                self._up()
            backoff = 0.0
            if res.published >= self.s.relay_batch_size:
                continue  # a full batch: more is probably waiting
            try:
                await self.settle()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._down(0, describe(exc), "relay: postgres unavailable", error=str(exc))
                continue
            await self._idle(stop)
        try:
            await self.settle()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("relay: the last mark failed; its rows will be sent again", error=str(exc))

    def _next_backoff(self, current: float) -> float:
        return min(self.s.relay_retry_max_s, max(0.2, current * 2))

    def _kafka_reason(self, exc: Exception) -> str:
        """Why Kafka failed. Before the relay ever reached it (start-up), an authentication or
        authorization error is a misconfiguration and ends the relay (`outage_reason`);
        once it has run, every Kafka error is an outage: retried, never fatal."""
        if self.slots == 0:
            return outage_reason(self.servers[1], exc) or describe(exc)
        return describe(exc)

    def _down(self, which: int, reason: str, event: str, **fields: Any) -> None:
        """A round failed on servers[which]: log it if due (once, then every 10 s)."""
        o = self.outages.down(self.servers[which], reason)
        if o is not None:
            log.warning(event, **fields, **o.fields(time.monotonic()))

    def _up(self) -> None:
        """A round that asked both servers went through: every outage is over."""
        for server in self.servers:
            if (o := self.outages.up(server)) is not None:
                down_for = round(time.monotonic() - o.since, 1)
                log.info(f"relay: {server.name} at {server.address} answers", down_for_s=down_for)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Sleep until NOTIFY, the poll interval, or stop; an idle relay still renews its
        leases (each round does) well within their length."""
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        timeout = min(self.s.relay_poll_interval_s, self.s.relay_lease_s / 3)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def drain_until(self, done: Any, stop: asyncio.Event | None = None) -> None:
        """Run rounds until the awaitable predicate `done()` is true (for one-shot commands)."""
        stop = stop or asyncio.Event()
        task = asyncio.create_task(self.run(stop))
        try:
            while not await done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await task


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):  # not wait_for: it can swallow a cancel on 3.11
            await stop.wait()
    except TimeoutError:
        pass
