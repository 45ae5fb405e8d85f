"""The relay's life: start, run rounds until stopped, close.

`Relay` joins the pieces (slots, Kafka link, round, housekeeping) and owns what ties them
together: the loop that re-shares partitions, backs off through Postgres and Kafka outages
(and tells one from the other), and rebuilds the Kafka clients after a failed round.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import structlog

from agentmesh.outbox.relay_housekeeping import Housekeeping
from agentmesh.outbox.relay_kafka import KafkaLink, _describe
from agentmesh.outbox.relay_rounds import RoundPublisher
from agentmesh.outbox.relay_slots import SlotConfigMismatch, SlotOwnership

log = structlog.get_logger("agentmesh.relay")


class Relay(RoundPublisher, KafkaLink, SlotOwnership, Housekeeping):
    """One relay process's worth of work. `run(stop)` until `stop` is set; several relays may
    run at once. `drain=True` takes every free slot, and `member=False` keeps the relay out
    of the head count that sets each relay's share (both for one-shot commands)."""

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.s.postgres_dsn, min_size=1, max_size=3)
        await self._connect_locks()

    async def prepare(self) -> None:
        """Kafka side: the topic set up, a producer connected, the partitions known."""
        await self._ensure_producer()

    async def close(self) -> None:
        try:
            await self.settle()
        except Exception as exc:  # Postgres gone: those rows stay unpublished, sent again
            log.warning("relay: the last mark failed; its rows will be sent again", error=str(exc))
        await self._reset_producer()
        if self._lock_conn is not None and not self._lock_conn.is_closed():
            await self._lock_conn.close()  # releases every slot at once
        self._lock_conn = None
        self.owned.clear()
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
        while not stop.is_set():
            try:
                await self.backlog()
                if time.monotonic() >= next_prune and self.s.outbox_retention_s > 0:
                    await self.prune()
                    next_prune = time.monotonic() + self.s.outbox_prune_interval_s
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("relay: housekeeping failed", error=str(exc))
            await _sleep_or_stop(stop, 2.0)

    async def _rounds(self, stop: asyncio.Event) -> None:
        backoff = 0.0
        next_rebalance = 0.0
        while not stop.is_set():
            now = time.monotonic()
            try:
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
                backoff = self._next_backoff(backoff)
                log.warning("relay: postgres unavailable", error=str(exc), retry_in=backoff)
                if self._lock_conn is not None and self._lock_conn.is_closed():
                    self.owned.clear()
                    self._lock_conn = None
                await _sleep_or_stop(stop, backoff)
                continue
            except Exception as exc:  # Kafka: start, metadata or topic set-up failed
                self.kafka_ok = False
                backoff = self._next_backoff(backoff)
                log.warning("relay: kafka unavailable", error=_describe(exc), retry_in=backoff)
                await self._reset_producer()
                await _sleep_or_stop(stop, backoff)
                continue
            if res.failed_partitions:
                self.kafka_ok = False
                backoff = self._next_backoff(backoff)
                log.warning(
                    "relay: kafka did not ack",
                    published=res.published,
                    partitions=sorted(res.failed_partitions),
                    error=next(iter(res.failed_partitions.values())),
                    retry_in=backoff,
                )
                # A new producer (and partition probe) for the next round: the broker may come
                # back as a new process, and the topic may have to be set up again.
                await self._reset_producer()
                await _sleep_or_stop(stop, backoff)
                continue
            self.kafka_ok = self._producer is not None or self.kafka_ok
            backoff = 0.0
            if res.published >= self.s.relay_batch_size:
                continue  # a full batch: more is probably waiting
            try:
                await self.settle()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("relay: postgres unavailable", error=str(exc))
                continue
            await self._idle(stop)
        try:
            await self.settle()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("relay: the last mark failed; its rows will be sent again", error=str(exc))

    def _next_backoff(self, current: float) -> float:
        return min(self.s.relay_retry_max_s, max(0.2, current * 2))

    async def _idle(self, stop: asyncio.Event) -> None:
        """Sleep until NOTIFY, the poll interval, or stop."""
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.s.relay_poll_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
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
