"""Crash loops: the entry that kills its process is found out alone, and only it is counted.

Some failures cannot be pinned on one entry while they happen: a segfault in a native
library, an OOM kill, `os._exit`, a hang that stops the heartbeat. The whole in-flight batch
then stays pending, is reclaimed after `claim_idle_ms`, and every entry of it gets one more
delivery. Run as a batch again and again, one crashing entry would carry its batch-mates to
`max_deliveries` and into the DLQ with it.

**The rule.** An entry reclaimed from a dead or stalled consumer is a *suspect* when it was
already delivered at least `suspect_after(max_deliveries)` times (2, or fewer when
`max_deliveries` leaves no room) without ever completing. Suspects are claimed one at a
time and each runs alone: the loop that claims it first waits, holding this process's
`Gate`, until no loop of the process has anything in flight, and no loop admits anything
else until it has settled. A crash then counts a delivery only against the entry that
caused it. Everything else keeps its speed: new entries, due retries (their failure was
pinned on them), and entries reclaimed after a single incomplete delivery (the usual
victims of one crash or a deploy's kill) are read and run in batches as before. So a valid
entry is counted at most twice by crashes it did not cause (once read, once reclaimed);
from then on it runs alone and completes. The crashing entry keeps crashing alone until it
is reclaimed with `max_deliveries` deliveries, and goes to the DLQ as `max_deliveries`
without running again.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Protocol

import structlog

from agentmesh.bus.entry import StreamEntry
from agentmesh.bus.streams import Streams
from agentmesh.settings import Settings

log = structlog.get_logger("agentmesh.consumer")

SUSPECT_AFTER = 2
"""Deliveries without completing after which a reclaimed entry runs alone."""


def suspect_after(max_deliveries: int) -> int:
    """The deliveries that make a reclaimed entry a suspect. Below 2 when `max_deliveries`
    is 2: its one run alone must still fit under the limit."""
    return max(1, min(SUSPECT_AFTER, max_deliveries - 1))


def split(idle: Sequence[tuple[str, int]], *, max_deliveries: int) -> tuple[list[str], list[str]]:
    """Idle pending entries (id, deliveries so far) -> (ids to claim as a batch, suspects).

    An entry already at `max_deliveries` is claimed with the batch: it goes to the DLQ
    without running (ConsumerLoop.admit), so it need not run alone."""
    limit = suspect_after(max_deliveries)
    batch = [i for i, n in idle if n < limit or n >= max_deliveries]
    suspects = [i for i, n in idle if limit <= n < max_deliveries]
    return batch, suspects


async def reclaim(
    streams: Streams,
    names: Iterable[str],
    *,
    mine: set[tuple[str, str]],
    settings: Settings,
    limit: int,
) -> tuple[list[StreamEntry], list[tuple[str, str]]]:
    """Entries of dead or stalled consumers on the streams `names`, except `mine` (this loop
    holds them already): (claimed, to run as a batch; (stream, id) of suspects, not claimed:
    each is claimed only when its turn to run alone comes)."""
    out: list[StreamEntry] = []
    suspects: list[tuple[str, str]] = []
    for stream in names:
        idle = await streams.idle_pending(stream, min_idle_ms=settings.claim_idle_ms, count=limit)
        idle = [(i, n) for i, n in idle if (stream, i) not in mine]
        batch, alone = split(idle, max_deliveries=settings.max_deliveries)
        out += await streams.claim(stream, batch, min_idle_ms=settings.claim_idle_ms)
        suspects += [(stream, i) for i in alone]
    return out, suspects


class InFlight(Protocol):
    def in_flight(self) -> int:
        """How many entries this consumer loop has admitted and not yet settled."""
        ...


class Isolating(InFlight, Protocol):
    """What `run_alone` needs of a consumer loop."""

    gate: Gate
    streams: Streams

    async def admit(self, batch: Sequence[StreamEntry]) -> None: ...


async def run_alone(
    suspects: Sequence[tuple[str, str]],
    loop: Isolating,
    *,
    claim_idle_ms: int,
    give_up: Callable[[], bool],
) -> None:
    """Claim and run each suspect alone in this process, and wait until it has settled
    (committed, scheduled for a retry, or dead-lettered) before the next one is claimed."""
    for stream, entry_id in suspects:
        async with loop.gate.alone(loop, give_up) as ok:
            if not ok:
                return
            claimed = await loop.streams.claim(stream, [entry_id], min_idle_ms=claim_idle_ms)
            if not claimed:  # another consumer took it meanwhile
                continue
            log.warning(
                "running a suspect alone",
                stream=stream,
                id=entry_id,
                deliveries=claimed[0].deliveries,
            )
            await loop.admit(claimed)
            await loop.gate.idle(give_up)  # nothing else runs: idle = this entry settled


class Gate:
    """Lets one consumer loop of this process run an entry with nothing else in flight.

    Every loop joins the gate of its process; a loop admits nothing while another holds it
    (`closed_to`), and the holder waits until every loop's in-flight entries have settled."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._holder: object | None = None
        self._settled = asyncio.Event()
        self._loops: weakref.WeakSet[InFlight] = weakref.WeakSet()

    def join(self, loop: InFlight) -> None:
        self._loops.add(loop)

    def closed_to(self, loop: object) -> bool:
        """True while another loop runs a suspect alone: `loop` must not admit anything."""
        return self._holder is not None and self._holder is not loop

    def busy(self) -> bool:
        return any(lp.in_flight() for lp in list(self._loops))

    def settled(self) -> None:
        """A loop settled entries: whoever waits for the process to be idle looks again."""
        self._settled.set()

    @contextlib.asynccontextmanager
    async def alone(self, loop: InFlight, give_up: Callable[[], bool]) -> AsyncIterator[bool]:
        """Hold the gate: wait until nothing of the process is in flight, then yield True
        (False when `give_up()` said to stop waiting). Released on leaving the block."""
        async with self._lock:
            self._holder = loop
            try:
                await self.idle(give_up)
                yield not give_up()
            finally:
                self._holder = None

    async def idle(self, give_up: Callable[[], bool]) -> None:
        """Wait until no loop of the process has anything in flight (or `give_up()`)."""
        while self.busy() and not give_up():
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._settled.wait()


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Gate] = weakref.WeakKeyDictionary()


def process_gate() -> Gate:
    """The gate shared by every consumer loop of this process (of its event loop): a crash
    ends all of them at once, so "alone" has to mean alone in the process."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return Gate()
    gate = _gates.get(running)
    if gate is None:
        gate = _gates[running] = Gate()
    return gate
