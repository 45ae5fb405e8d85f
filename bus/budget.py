"""Shared rate budgets: one token bucket per dependency name, kept in Redis (bus/lua/budget.lua).

Every replica of every agent that names a dependency with a budget takes from the same
bucket, so ten replicas make the calls one would be allowed, not ten times as many. Each take
is one atomic script that refills by the Redis server's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from agentmesh.bus.scripts import Scripts

BUDGET_PREFIX = "mesh:budget:"
BUDGET_TTL_S = 7 * 86400  # a bucket nobody took from for a week is forgotten (stats included)


def budget_key(name: str) -> str:
    return f"{BUDGET_PREFIX}{name}"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, kw_only=True)
class Take:
    """A take's answer. Granted: sleep `wait_s` (0: none), then call. Refused: nothing was
    taken; the units are there again in `wait_s`."""

    granted: bool
    wait_s: float
    tokens: float  # the balance after the take (below zero while calls wait their turn)


@dataclass(frozen=True, kw_only=True)
class BucketState:
    """A bucket as `mesh status` shows it."""

    name: str
    rate_per_s: float
    burst: float
    tokens: float  # now, refilled by the server's clock
    granted: int  # takes granted (each is a call made)
    refused: int  # takes refused: the call's entry was parked for later
    exhausted: int  # times the bucket ran empty (a take found too few units)
    since: float  # server time (epoch s) the bucket was created, full: no grant before it


class Buckets:
    """The budget buckets of one Redis."""

    def __init__(self, redis: Redis, scripts: Scripts | None = None) -> None:
        self.redis = redis
        self.scripts = scripts or Scripts(redis)

    async def take(
        self, name: str, *, rate_per_s: float, burst: float, amount: float, max_wait_s: float
    ) -> Take:
        reply = await self.scripts.budget(
            keys=[budget_key(name)],
            args=["take", repr(rate_per_s), repr(burst), repr(amount), repr(max_wait_s),
                  BUDGET_TTL_S],
        )  # fmt: skip
        granted, wait, tokens = reply
        return Take(granted=int(granted) == 1, wait_s=float(wait), tokens=float(tokens))

    async def charge(self, name: str, *, rate_per_s: float, burst: float, amount: float) -> float:
        """Take `amount` more units after a call (negative gives back); the balance after."""
        reply = await self.scripts.budget(
            keys=[budget_key(name)],
            args=["charge", repr(rate_per_s), repr(burst), repr(amount), 0, BUDGET_TTL_S],
        )
        return float(reply)

    async def state(self, name: str) -> BucketState | None:
        reply = await self.scripts.budget(keys=[budget_key(name)], args=["peek"])
        if not reply:
            return None
        tokens, rate, burst, granted, refused, exhausted, since = (_s(x) for x in reply)
        return BucketState(
            name=name,
            rate_per_s=float(rate),
            burst=float(burst),
            tokens=float(tokens),
            granted=int(float(granted)),
            refused=int(float(refused)),
            exhausted=int(float(exhausted)),
            since=float(since),
        )

    async def states(self) -> list[BucketState]:
        """Every bucket in this Redis, by name."""
        names = sorted(
            {_s(k)[len(BUDGET_PREFIX) :] async for k in self.redis.scan_iter(
                match=f"{BUDGET_PREFIX}*", count=500, _type="hash")}
        )  # fmt: skip
        found = [await self.state(n) for n in names]
        return [b for b in found if b is not None]
