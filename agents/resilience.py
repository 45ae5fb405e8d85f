"""Calls to dependencies (LLM APIs, payment gateways, ...): retries with backoff behind a breaker.

Two layers, on purpose:
- inside one delivery, tenacity retries a flaky call a few times with exponential backoff
  and jitter, giving up at once on errors marked non-retryable;
- around all calls to one dependency, an aiobreaker circuit breaker. While it is open the
  runtime stops reading the streams whose handlers need it, so entries wait in Redis instead
  of burning retries and deliveries; when the reset timeout passes, one probe delivery runs.

A dependency may also declare a `Budget`: a token bucket in Redis (agentmesh.bus.budget)
shared by every replica of every agent naming the dependency. A call takes its units first;
when the bucket refills within `max_wait_s` the call waits its turn, else it raises
`BudgetExhausted`, which parks the message for later without counting a failure or a
delivery, and the runtime stops reading the streams that lead only to empty budgets.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerState
from aiobreaker.listener import CircuitBreakerListener
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

if TYPE_CHECKING:
    from agentmesh.bus.budget import Buckets

T = TypeVar("T")
log = structlog.get_logger("agentmesh.resilience")


class NonRetryable(Exception):
    """Raise (or subclass) for failures no retry can fix: bad request, refused by policy.

    From a dependency call it skips the call-level retries; from a handler it sends the
    message to the DLQ at once instead of after `max_deliveries`.
    """


@dataclass(kw_only=True, frozen=True)
class RetryPolicy:
    attempts: int = 3
    initial_s: float = 0.1
    max_s: float = 2.0
    jitter_s: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    never_on: tuple[type[BaseException], ...] = (NonRetryable,)

    def should_retry(self, exc: BaseException) -> bool:
        if isinstance(exc, (CircuitBreakerError, BudgetExhausted, *self.never_on)):
            return False
        return isinstance(exc, self.retry_on)


class BudgetExhausted(Exception):
    """The dependency's shared budget has no room within its `max_wait_s`. Not the message's
    fault: its entry is parked (uncounted) and runs again after `retry_after_s`."""

    def __init__(self, dependency: str, retry_after_s: float) -> None:
        super().__init__(f"budget of {dependency!r} exhausted; room again in {retry_after_s:.2f} s")
        self.dependency = dependency
        self.retry_after_s = retry_after_s


@dataclass(kw_only=True, frozen=True)
class Budget:
    """A rate limit shared by every replica: `rate` units per `per_s` seconds, at most `burst`
    at once (default: `rate`). Each call takes `reserve` units before it runs (1: a budget of
    requests); `cost(result)`, when given, says how many units a finished call really used
    (LLM tokens, say) and the difference is charged after it. A call waits at most
    `max_wait_s` for its turn; beyond that its message is parked for later."""

    rate: float
    per_s: float = 1.0
    burst: float | None = None
    reserve: float = 1.0
    cost: Callable[[Any], float] | None = None
    max_wait_s: float = 1.0

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.per_s > 0 and math.isfinite(self.rate / self.per_s)):
            raise ValueError("a budget needs a positive rate and period")
        if self.reserve <= 0 or self.max_wait_s < 0:
            raise ValueError("a budget's reserve must be positive and max_wait_s not negative")
        if self.capacity < self.reserve:
            raise ValueError("a budget's burst must hold at least one call's reserve")

    @property
    def rate_per_s(self) -> float:
        return self.rate / self.per_s

    @property
    def capacity(self) -> float:
        return self.rate if self.burst is None else self.burst


@dataclass(kw_only=True, frozen=True)
class DependencySpec:
    """How an agent talks to one named dependency."""

    name: str
    fail_max: int = 5
    reset_timeout_s: float = 30.0
    retry: RetryPolicy = RetryPolicy()
    budget: Budget | None = None


TAKES_AT_ONCE = 8
"""Budget round trips one replica makes at once, per dependency."""


class _Openings(CircuitBreakerListener):  # type: ignore[misc]
    """Counts the breaker's openings. Its state alone is a poor record: with a short reset
    timeout a breaker is open for a second or two at a time, which a status poll can miss."""

    def __init__(self, on_change: Callable[[], None] | None) -> None:
        self.opened = 0
        self.last_opened_at: float | None = None  # wall clock, for operators
        self.on_change = on_change

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        if new is not None and new.state == CircuitBreakerState.OPEN:
            self.opened += 1
            self.last_opened_at = time.time()
        if self.on_change is not None:
            self.on_change()


class Dependency:
    """One dependency's breaker and retry policy, shared by all handlers of a process.

    `on_change` is called (synchronously, in the event loop) whenever the breaker changes
    state, so the runner can report a change at once instead of at its next poll."""

    def __init__(self, spec: DependencySpec, on_change: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.buckets: Buckets | None = None  # set by attach(): where the budget is kept
        self.blocked_until = 0.0  # monotonic: the shared budget has no room before then
        self.gate_until = 0.0  # monotonic: read no new entries for it before then
        self.budget_refused = 0  # calls of this replica parked for want of budget
        self.budget_waited = 0  # calls of this replica that waited their turn
        self.budget_tokens: float | None = None  # the bucket's balance as last seen here
        # At most this many takes of this replica at once: 200 handlers starting together
        # would otherwise want 200 Redis connections of the runner's pool (and exhaust it).
        self._takes = asyncio.Semaphore(TAKES_AT_ONCE)
        self._openings = _Openings(on_change)
        self.breaker = CircuitBreaker(
            fail_max=spec.fail_max,
            timeout_duration=timedelta(seconds=spec.reset_timeout_s),
            exclude=[NonRetryable],
            listeners=[self._openings],
            name=spec.name,
        )

    @property
    def opened(self) -> int:
        """How many times the breaker has opened since the process started."""
        return self._openings.opened

    @property
    def last_opened_at(self) -> float | None:
        return self._openings.last_opened_at

    def report(self) -> dict[str, Any]:
        """What `mesh status` shows of this breaker."""
        return {
            "state": self.state,
            "opened": self.opened,
            "last_opened_at": self.last_opened_at,
        }

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> str:
        """'closed', 'open' or 'half-open' (open with its timeout passed reads 'half-open')."""
        st = self.breaker.current_state
        if st == CircuitBreakerState.OPEN:
            return "half-open" if self._timeout_elapsed() else "open"
        return "half-open" if st == CircuitBreakerState.HALF_OPEN else "closed"

    def _timeout_elapsed(self) -> bool:
        opened = self.breaker._state_storage.opened_at
        return opened is None or datetime.utcnow() >= opened + self.breaker.timeout_duration

    # -- the shared budget --------------------------------------------------------------------
    def attach(self, buckets: Buckets) -> None:
        """Keep this dependency's budget in `buckets` (the runner's Redis)."""
        self.buckets = buckets

    @property
    def budget_empty(self) -> bool:
        """The read gate's signal: True from a refused take of this replica until the entries
        it parked have all come back (room, plus their spread): reading more before that
        would only park more."""
        return self.spec.budget is not None and time.monotonic() < self.gate_until

    async def _take(self) -> None:
        """Take one call's reserve from the shared bucket, waiting up to `max_wait_s` for it;
        raise BudgetExhausted when it has no room within that time."""
        budget = self.spec.budget
        if budget is None:
            return
        if self.buckets is None:
            raise RuntimeError(f"dependency {self.name!r} has a budget but no Redis (attach())")
        async with self._takes:
            now = time.monotonic()  # after the queue: a take refused meanwhile is known here
            if now < self.blocked_until:  # known empty: no round trip until it has room
                raise self._refused(self.blocked_until - now)
            take = await self.buckets.take(
                self.name,
                rate_per_s=budget.rate_per_s,
                burst=budget.capacity,
                amount=budget.reserve,
                max_wait_s=budget.max_wait_s,
            )
        self.budget_tokens = take.tokens
        if not take.granted:
            self.blocked_until = max(self.blocked_until, time.monotonic() + take.wait_s)
            raise self._refused(take.wait_s)
        if take.wait_s > 0:
            self.budget_waited += 1
            await asyncio.sleep(take.wait_s)

    def _refused(self, room_in_s: float) -> BudgetExhausted:
        """Parked entries come back spread over `max_wait_s` after the bucket has room, not
        all at once; the reader takes nothing new for the dependency until they are back."""
        self.budget_refused += 1
        spread = max(self.spec.budget.max_wait_s if self.spec.budget else 0.0, 0.1)
        self.gate_until = max(self.gate_until, time.monotonic() + room_in_s + spread)
        return BudgetExhausted(self.name, room_in_s + random.uniform(0, spread))

    async def _charge(self, result: Any) -> None:
        """Charge what the call really cost beyond its reserve. Never fails the call: it has
        happened, and failing now would only run it again. A cost that cannot be computed
        (the function raises, or says NaN) or a Redis error is logged and not charged."""
        budget = self.spec.budget
        if budget is None or budget.cost is None or self.buckets is None:
            return
        try:
            extra = float(budget.cost(result)) - budget.reserve
            if not math.isfinite(extra):
                raise ValueError(f"cost is {extra + budget.reserve}")
            if extra:
                async with self._takes:
                    self.budget_tokens = await self.buckets.charge(
                        self.name, rate_per_s=budget.rate_per_s, burst=budget.capacity,
                        amount=extra,
                    )  # fmt: skip
        except Exception as exc:
            log.warning("budget not charged", dependency=self.name, error=f"{exc!r}")

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Each attempt takes its units from the budget first (outside the breaker: an empty
        budget is no failure of the dependency), then calls through the breaker."""
        policy = self.spec.retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_exponential(multiplier=policy.initial_s, max=policy.max_s)
            + wait_random(0, policy.jitter_s),
            retry=retry_if_exception(policy.should_retry),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._take()
                result: T = await self.breaker.call_async(fn, *args, **kwargs)
        await self._charge(result)  # once, for the attempt that succeeded
        return result


STATE_VALUE = {"closed": 0, "half-open": 1, "open": 2}
