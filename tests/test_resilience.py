"""Retries and breakers around dependency calls: pure logic, no server."""

from __future__ import annotations

import asyncio

import pytest
from aiobreaker import CircuitBreakerError

from agentmesh.agents.resilience import Dependency, DependencySpec, NonRetryable, RetryPolicy

FAST = RetryPolicy(attempts=3, initial_s=0.001, max_s=0.005, jitter_s=0.001)


class Flaky:
    def __init__(self, failures: int, exc: Exception | None = None) -> None:
        self.failures, self.calls = failures, 0
        self.exc = exc or ConnectionError("down")

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


async def test_transient_failures_are_retried() -> None:
    dep = Dependency(DependencySpec(name="d", fail_max=10, retry=FAST))
    fn = Flaky(2)
    assert await dep.call(fn) == "ok"
    assert fn.calls == 3


async def test_gives_up_after_the_attempts() -> None:
    dep = Dependency(DependencySpec(name="d", fail_max=10, retry=FAST))
    fn = Flaky(5)
    with pytest.raises(ConnectionError):
        await dep.call(fn)
    assert fn.calls == 3


async def test_non_retryable_is_not_retried_and_does_not_trip_the_breaker() -> None:
    dep = Dependency(DependencySpec(name="d", fail_max=1, retry=FAST))
    fn = Flaky(5, NonRetryable("bad request"))
    with pytest.raises(NonRetryable):
        await dep.call(fn)
    assert fn.calls == 1 and dep.state == "closed"


async def test_breaker_opens_then_lets_a_probe_through() -> None:
    dep = Dependency(
        DependencySpec(name="d", fail_max=2, reset_timeout_s=0.2, retry=RetryPolicy(attempts=1))
    )
    fn = Flaky(2)
    for _ in range(2):
        with pytest.raises((ConnectionError, CircuitBreakerError)):
            await dep.call(fn)
    assert dep.state == "open"
    with pytest.raises(CircuitBreakerError):
        await dep.call(fn)
    assert fn.calls == 2, "an open breaker does not call the dependency"
    await asyncio.sleep(0.25)
    assert dep.state == "half-open"
    assert await dep.call(fn) == "ok"
    assert dep.state == "closed"


async def test_openings_are_counted_and_each_change_is_signalled() -> None:
    changes: list[str] = []
    dep = Dependency(
        DependencySpec(name="d", fail_max=1, reset_timeout_s=0.05, retry=RetryPolicy(attempts=1)),
        on_change=lambda: changes.append("changed"),
    )
    assert dep.report() == {"state": "closed", "opened": 0, "last_opened_at": None}
    fn = Flaky(2)
    with pytest.raises((ConnectionError, CircuitBreakerError)):
        await dep.call(fn)
    assert dep.opened == 1 and dep.last_opened_at is not None
    await asyncio.sleep(0.06)
    with pytest.raises(
        (ConnectionError, CircuitBreakerError)
    ):  # the half-open probe fails: open again
        await dep.call(fn)
    assert dep.opened == 2
    await asyncio.sleep(0.06)
    assert await dep.call(fn) == "ok"
    assert dep.report()["state"] == "closed" and dep.opened == 2
    # closed -> open, open -> half-open, half-open -> open, open -> half-open, -> closed
    assert len(changes) == 5
