"""bus/ against a real Redis: trimming, claims, idempotent publish, DLQ copy-then-ack."""

from __future__ import annotations

from redis.asyncio import Redis

from agentmesh.bus import DeadLetter, Outgoing, StreamEntry, Streams


async def test_trim_never_drops_an_unacked_or_undelivered_entry(redis: Redis) -> None:
    ids = [(await redis.xadd("s", {"envelope": f"{i}"})).decode() for i in range(100)]
    fast = Streams(redis, group="fast", consumer="c1")
    slow = Streams(redis, group="slow", consumer="c1")
    await fast.ensure_group("s")
    await slow.ensure_group("s")
    got = await fast.read(["s"], count=60, block_ms=None)
    await fast.ack(got[:30])  # fast: 30 acked, 30 pending, 40 undelivered
    await slow.read(["s"], count=10, block_ms=None)  # slow: 10 pending, 90 undelivered

    assert await fast.trim("s", retention_s=0) == ids[0]  # slow still needs everything
    assert await redis.xlen("s") == 100

    await slow.ack([_entry("s", i) for i in ids[:10]])
    await redis.xgroup_destroy("s", "slow")
    await fast.trim("s", retention_s=0)
    remaining = [i.decode() for i, _ in await redis.xrange("s")]
    assert remaining == ids[30:], "exactly the acked prefix was trimmed"
    # the 30 pending entries can still be reclaimed, with their data
    claimed = await Streams(redis, group="fast", consumer="c2").autoclaim(
        "s", min_idle_ms=0, count=100
    )
    assert [e.id for e in claimed] == ids[30:60] and all(e.raw for e in claimed)
    assert all(e.deliveries == 2 for e in claimed)


async def test_trim_keeps_recent_entries_for_retention(redis: Redis) -> None:
    for i in range(10):
        await redis.xadd("s", {"envelope": f"{i}"})
    g = Streams(redis, group="g", consumer="c")
    await g.ensure_group("s")
    await g.ack(await g.read(["s"], count=10, block_ms=None))
    await g.trim("s", retention_s=3600)
    assert await redis.xlen("s") == 10
    await g.trim("s", retention_s=0)
    assert await redis.xlen("s") == 0


async def test_claim_own_does_not_steal(redis: Redis) -> None:
    await redis.xadd("s", {"envelope": "x"})
    a = Streams(redis, group="g", consumer="a")
    b = Streams(redis, group="g", consumer="b")
    await a.ensure_group("s")
    (entry,) = await a.read(["s"], count=1, block_ms=None)
    assert await a.claim_own("s", [entry.id], count=False) == {entry.id: 1}
    assert await a.claim_own("s", [entry.id], count=True) == {entry.id: 2}
    (taken,) = await b.autoclaim("s", min_idle_ms=0, count=10)
    assert taken.deliveries == 3
    assert await a.claim_own("s", [entry.id], count=False) == {}, "a lost it to b"
    assert await b.claim_own("s", [entry.id], count=False) == {entry.id: 3}


async def test_publish_is_idempotent_per_event_id(redis: Redis) -> None:
    bus = Streams(redis, group="-", consumer="-")
    first = await bus.publish([Outgoing("t", "e1", b"one"), Outgoing("t", "e2", b"two")])
    again = await bus.publish([Outgoing("t", "e1", b"one"), Outgoing("t", "e3", b"three")])
    assert all(first) and again[0] is None and again[1] is not None
    assert await redis.xlen("t") == 3


async def test_dead_letter_copies_then_acks(redis: Redis) -> None:
    await redis.xadd("s", {"envelope": b"{bad"})
    g = Streams(redis, group="g", consumer="c", dlq_stream="dlq")
    await g.ensure_group("s")
    (entry,) = await g.read(["s"], count=1, block_ms=None)
    await g.record_failures([(entry, "boom")])
    letter = DeadLetter.from_exception(
        entry, ValueError("bad"), reason="malformed_json", group="g", agent="a"
    )
    await g.dead_letter([letter])
    (row,) = await redis.xrange("dlq")
    fields = row[1]
    assert fields[b"envelope"] == b"{bad" and fields[b"reason"] == b"malformed_json"
    assert fields[b"first_failure"] <= fields[b"last_failure"]
    assert (await redis.xpending("s", "g"))["pending"] == 0


async def test_nogroup_is_recovered(redis: Redis) -> None:
    g = Streams(redis, group="g", consumer="c")
    await g.ensure_group("s")
    await redis.delete("s")
    assert await g.read(["s"], count=1, block_ms=None) == []  # group re-created
    await redis.xadd("s", {"envelope": "x"})
    assert len(await g.read(["s"], count=1, block_ms=None)) == 1


def _entry(stream: str, entry_id: str) -> StreamEntry:
    return StreamEntry(stream=stream, id=entry_id, fields={})


async def test_idle_consumers_without_pending_are_pruned(redis: Redis) -> None:
    for i in range(3):
        await redis.xadd("s", {"envelope": f"{i}"})
    old = Streams(redis, group="g", consumer="old")
    busy = Streams(redis, group="g", consumer="busy")
    me = Streams(redis, group="g", consumer="me")
    await old.ensure_group("s")
    await old.ack(await old.read(["s"], count=1, block_ms=None))
    await busy.read(["s"], count=1, block_ms=None)  # keeps one pending entry
    await me.read(["s"], count=1, block_ms=None)
    assert await me.prune_consumers("s", idle_ms=0) == ["old"]
    names = {c["name"].decode() for c in await redis.xinfo_consumers("s", "g")}
    assert names == {"busy", "me"}
