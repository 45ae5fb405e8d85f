"""Redis Streams transport: the only module that speaks XREADGROUP, XACK, XAUTOCLAIM and friends.

Every method is one round trip (a pipeline or a Lua script) for a whole batch, so the
runtime's cost per message stays close to a raw redis-py loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentmesh.bus.deadletter import DeadLetter
from agentmesh.bus.entry import Outgoing, StreamEntry
from agentmesh.bus.scripts import Scripts

FAILURES_TTL_S = 7 * 86400


def dedup_key(stream: str, event_id: str) -> str:
    return f"mesh:dedup:{stream}:{event_id}"


def failures_key(stream: str, group: str, entry_id: str) -> str:
    return f"mesh:failures:{stream}:{group}:{entry_id}"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Streams:
    """One consumer's view of Redis: `group` is the agent type, `consumer` this process's loop."""

    def __init__(
        self,
        redis: Redis,
        *,
        group: str,
        consumer: str,
        dedup_ttl_s: int = 7 * 86400,
        dlq_stream: str = "mesh:dlq",
    ) -> None:
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.dedup_ttl_s = dedup_ttl_s
        self.dlq_stream = dlq_stream
        self.scripts = Scripts(redis)

    # -- groups -------------------------------------------------------------------------
    async def ensure_group(self, stream: str) -> None:
        """Create the group at the start of the stream (MKSTREAM); an existing group is kept."""
        try:
            await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- reading ------------------------------------------------------------------------
    async def read(
        self, streams: Sequence[str], *, count: int, block_ms: int | None
    ) -> list[StreamEntry]:
        """New entries for this group. A deleted stream or group (NOGROUP) is re-created once."""
        if not streams:
            return []
        try:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {s: ">" for s in streams}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            for s in streams:
                await self.ensure_group(s)
            return []
        out: list[StreamEntry] = []
        rows: list[Any] = list(reply or [])
        for stream, entries in rows:
            name = _s(stream)
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending (Redis < 7 shape)
                    continue
                out.append(StreamEntry(stream=name, id=_s(entry_id), fields=fields, deliveries=1))
        return out

    async def first_copies(
        self, entries: Sequence[tuple[StreamEntry, str]]
    ) -> set[tuple[str, str]]:
        """Of (entry, event id) pairs, the (stream, id) of entries that are their event's first and
        only copy on their stream: the publish step's dedup key for (stream, event id) names
        that very entry (publish.lua writes it in the same script as the XADD). One MGET.

        An entry XADDed some other way (no key), a second copy (the key names the first) or
        one whose key expired or was lost is not in the set."""
        if not entries:
            return set()
        values: list[Any] = await self.redis.mget([dedup_key(e.stream, i) for e, i in entries])
        return {
            (e.stream, e.id)
            for (e, _), v in zip(entries, values, strict=True)
            if v is not None and _s(v) == e.id
        }

    async def autoclaim(self, stream: str, *, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """Take over entries idle longer than `min_idle_ms` (their consumer died or hung)."""
        try:
            reply = await self.redis.xautoclaim(
                stream, self.group, self.consumer, min_idle_ms, start_id="0-0", count=count
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group(stream)
            return []
        claimed = [(_s(i), f) for i, f in reply[1] if f is not None]
        if not claimed:
            return []
        counts = await self.delivery_counts(stream, [i for i, _ in claimed])
        return [
            StreamEntry(stream=stream, id=i, fields=f, deliveries=counts.get(i, 1))
            for i, f in claimed
        ]

    async def idle_pending(
        self, stream: str, *, min_idle_ms: int, count: int
    ) -> list[tuple[str, int]]:
        """(id, deliveries so far) of this group's entries idle longer than `min_idle_ms`
        (their consumer died or hung), oldest first. Nothing is claimed or counted: the
        consumer decides first which to claim as a batch and which to run alone."""
        try:
            rows: Any = await self.redis.xpending_range(
                stream, self.group, min="-", max="+", count=count, idle=min_idle_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group(stream)
            return []
        return [(_s(r["message_id"]), int(r["times_delivered"])) for r in rows]

    async def claim(
        self, stream: str, ids: Sequence[str], *, min_idle_ms: int
    ) -> list[StreamEntry]:
        """XCLAIM entries still idle longer than `min_idle_ms`, one more delivery each; an
        entry another consumer took meanwhile (or deleted from the stream) is left out."""
        if not ids:
            return []
        try:
            reply: Any = await self.redis.xclaim(
                stream, self.group, self.consumer, min_idle_ms, list(ids)
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group(stream)
            return []
        claimed = [(_s(i), f) for i, f in reply if f is not None]
        if not claimed:
            return []
        counts = await self.delivery_counts(stream, [i for i, _ in claimed])
        return [
            StreamEntry(stream=stream, id=i, fields=f, deliveries=counts.get(i, 1))
            for i, f in claimed
        ]

    async def delivery_counts(self, stream: str, ids: Sequence[str]) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.xpending_range(stream, self.group, min=i, max=i, count=1)
        out: dict[str, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                out[_s(row["message_id"])] = int(row["times_delivered"])
        return out

    async def claim_own(self, stream: str, ids: Sequence[str], *, count: bool) -> dict[str, int]:
        """Keep (touch) or re-deliver (count) entries this consumer still owns.

        Returns id -> delivery count for the entries still ours; lost ones are left out.
        """
        if not ids:
            return {}
        mode = "count" if count else "touch"
        reply = await self.scripts.claim_own(
            keys=[stream], args=[self.group, self.consumer, mode, *ids]
        )
        return {i: int(c) for i, c in zip(ids, reply, strict=True) if int(c) >= 0}

    # -- writing ------------------------------------------------------------------------
    async def publish(self, events: Sequence[Outgoing]) -> list[str | None]:
        """XADD each event once per dedup window; returns new entry ids (None: already there)."""
        if not events:
            return []
        keys: list[str] = []
        args: list[bytes | str | int] = [self.dedup_ttl_s]
        for ev in events:
            keys += [ev.stream, dedup_key(ev.stream, ev.event_id)]
            args.append(ev.wire)
        reply = await self.scripts.publish(keys=keys, args=args)
        return [_s(r) if r else None for r in reply]

    async def ack(self, entries: Iterable[StreamEntry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.id)
        if not by_stream:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self.group, *ids)
        await pipe.execute()

    # -- failures and the DLQ -----------------------------------------------------------
    async def record_failures(self, failures: Sequence[tuple[StreamEntry, str]]) -> None:
        """Remember when entries first and last failed, across processes (for the DLQ record).

        One pipeline for the whole batch's failures."""
        if not failures:
            return
        now = datetime.now(UTC).isoformat()
        pipe = self.redis.pipeline(transaction=False)
        for entry, error in failures:
            key = failures_key(entry.stream, self.group, entry.id)
            pipe.hsetnx(key, "first_failure", now)
            pipe.hset(key, mapping={"last_failure": now, "last_error": error[:1000]})
            pipe.hincrby(key, "failures", 1)
            pipe.expire(key, FAILURES_TTL_S)
        await pipe.execute()

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> list[str]:
        """Copy each entry to the DLQ, then ack the original: both in one MULTI, so neither
        a crash nor a race can ack an entry whose DLQ copy was not written."""
        if not letters:
            return []
        read = self.redis.pipeline(transaction=False)
        for dl in letters:
            read.hgetall(failures_key(dl.entry.stream, self.group, dl.entry.id))
        for dl, hist in zip(letters, await read.execute(), strict=True):
            if hist:
                dl.first_failure = _s(hist.get(b"first_failure", dl.first_failure))
        pipe = self.redis.pipeline(transaction=True)
        for dl in letters:
            pipe.xadd(self.dlq_stream, dl.fields())  # type: ignore[arg-type]
            pipe.xack(dl.entry.stream, self.group, dl.entry.id)
            pipe.delete(failures_key(dl.entry.stream, self.group, dl.entry.id))
        reply = await pipe.execute()
        return [_s(reply[3 * i]) for i in range(len(letters))]

    # -- housekeeping -------------------------------------------------------------------
    async def trim(self, stream: str, *, retention_s: float) -> str | None:
        """Drop entries every group is done with and that are older than `retention_s`."""
        floor_ms = int((time.time() - retention_s) * 1000)
        reply = await self.scripts.trim(keys=[stream], args=[f"{max(floor_ms, 0)}-0"])
        return _s(reply) if reply else None

    async def prune_consumers(self, stream: str, *, idle_ms: int) -> list[str]:
        """Forget consumers of this group that own nothing and were idle for `idle_ms`.

        Every restarted process has a new consumer name; without this the group's consumer
        list grows forever. A consumer with pending entries is never deleted (that would
        drop its pending entries from the group).
        """
        try:
            consumers = await self.redis.xinfo_consumers(stream, self.group)
        except ResponseError:
            return []
        gone = [
            _s(c["name"])
            for c in consumers
            if int(c["pending"]) == 0
            and int(c["idle"]) >= idle_ms
            and _s(c["name"]) != self.consumer
        ]
        for name in gone:
            await self.redis.xgroup_delconsumer(stream, self.group, name)
        return gone

    async def group_info(self, stream: str) -> dict[str, int]:
        """pending and lag of this group on `stream` (lag -1 when Redis cannot tell)."""
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return {"pending": 0, "lag": 0}
        for g in groups:
            if _s(g["name"]) == self.group:
                lag = g.get("lag")
                return {"pending": int(g["pending"]), "lag": int(lag) if lag is not None else -1}
        return {"pending": 0, "lag": 0}
