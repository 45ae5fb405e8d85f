"""The failure path of a consumer loop: an entry that cannot be done is retried or dead-lettered.

Kept out of agents/consumer.py because it is the one place that decides an entry's fate after
something went wrong, whichever stage found it: admission (poison, too many deliveries) and
settling (a handler error or timeout, a message the commit refused). Reading it alone answers
"when is a message retried, when does it go to the DLQ, and what is counted"; the loop only
hands the failures over. Retries are scheduled on the loop's own queue (`schedule`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Protocol

import structlog
from aiobreaker import CircuitBreakerError

from agentmesh.agents.metrics import Metrics
from agentmesh.agents.resilience import BudgetExhausted, NonRetryable
from agentmesh.bus.deadletter import DeadLetter
from agentmesh.bus.entry import StreamEntry
from agentmesh.bus.streams import Streams
from agentmesh.schemas.errors import PoisonMessage
from agentmesh.settings import Settings

log = structlog.get_logger("agentmesh.consumer")


class Schedule(Protocol):
    """The loop's retry queue: run `entry` again after `delay` s (`count`: as a delivery)."""

    def __call__(self, entry: StreamEntry, *, delay: float, count: bool) -> None: ...


class NoHandler(PoisonMessage):
    reason = "no_handler"


class TooManyDeliveries(Exception):
    pass


class HandlerTimeout(Exception):
    """A handler exceeded its time limit; retried like any failure, then dead-lettered."""


class Failures:
    """One consumer loop's failure path (its own `Streams`, the process's metrics)."""

    def __init__(
        self,
        *,
        streams: Streams,
        settings: Settings,
        metrics: Metrics,
        agent: str,
        schedule: Schedule,
    ) -> None:
        self.streams = streams
        self.settings = settings
        self.metrics = metrics
        self.agent = agent
        self.schedule = schedule

    async def failed(self, failures: Sequence[tuple[StreamEntry, Exception]]) -> None:
        """Handler runs that failed: record them, then retry with backoff or dead-letter.
        An open breaker or an empty shared budget is not the message's fault: the entry waits,
        uncounted (no failure recorded, no delivery added when it runs again)."""
        s, m, name = self.settings, self.metrics, self.agent
        dead: list[DeadLetter] = []
        waits = (CircuitBreakerError, BudgetExhausted)
        counted = [(e, x) for e, x in failures if not isinstance(x, waits)]
        await self.streams.record_failures([(e, f"{type(x).__name__}: {x}") for e, x in counted])
        for e, exc in failures:
            if isinstance(exc, BudgetExhausted):  # room again in retry_after_s (spread)
                self.schedule(e, delay=exc.retry_after_s, count=False)
                continue
            if isinstance(exc, CircuitBreakerError):  # not the message's fault: wait, uncounted
                self.schedule(e, delay=0.5, count=False)
                continue
            etype = _type_of(e)
            m.failed.labels(name, etype).inc()
            if isinstance(exc, NonRetryable):
                dead.append(self.letter(e, exc, "non_retryable"))
            elif e.deliveries >= s.max_deliveries:
                dead.append(self.letter(e, exc, "max_deliveries"))
            else:
                delay = min(s.retry_initial_s * 2 ** (e.deliveries - 1), s.retry_max_s)
                self.schedule(e, delay=delay * random.uniform(0.8, 1.2), count=True)
                m.retried.labels(name, etype).inc()
                log.info(
                    "handler failed, will retry", id=e.id, deliveries=e.deliveries, error=str(exc)
                )
        await self.dead_letter(dead)

    async def dead_letter(self, dead: Sequence[DeadLetter]) -> None:
        if not dead:
            return
        await self.streams.dead_letter(dead)
        for d in dead:
            self.metrics.dead_lettered.labels(self.agent, d.reason).inc()
            log.warning(
                "dead-lettered",
                stream=d.entry.stream,
                id=d.entry.id,
                reason=d.reason,
                error=d.error,
            )

    def letter(
        self, e: StreamEntry, exc: BaseException, reason: str, *, with_tb: bool = True
    ) -> DeadLetter:
        agent = self.agent
        return DeadLetter.from_exception(
            e, exc, reason=reason, group=agent, agent=agent, with_traceback=with_tb
        )


def _type_of(e: StreamEntry) -> str:
    try:
        return str(json.loads(e.raw).get("type", "?"))
    except Exception:
        return "?"
