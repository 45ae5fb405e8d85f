"""Calls to dependencies (LLM APIs, payment gateways, ...): retries with backoff behind a breaker.

Two layers, on purpose:
- inside one delivery, tenacity retries a flaky call a few times with exponential backoff
  and jitter, giving up at once on errors marked non-retryable;
- around all calls to one dependency, an aiobreaker circuit breaker. While it is open the
  runtime stops reading the streams whose handlers need it, so entries wait in Redis instead
  of burning retries and deliveries; when the reset timeout passes, one probe delivery runs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerState
from aiobreaker.listener import CircuitBreakerListener
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

T = TypeVar("T")


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
        if isinstance(exc, (CircuitBreakerError, *self.never_on)):
            return False
        return isinstance(exc, self.retry_on)


@dataclass(kw_only=True, frozen=True)
class DependencySpec:
    """How an agent talks to one named dependency."""

    name: str
    fail_max: int = 5
    reset_timeout_s: float = 30.0
    retry: RetryPolicy = RetryPolicy()


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

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
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
                result: T = await self.breaker.call_async(fn, *args, **kwargs)
        return result


STATE_VALUE = {"closed": 0, "half-open": 1, "open": 2}
