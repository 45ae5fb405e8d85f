"""The effectively-once contract, against real Redis and PostgreSQL and real agent processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
from redis.asyncio import Redis

from agentmesh import devstack
from tests.conftest import ROOT, AgentProcess, eventually
from tests.helpers import actions, dlq, group_state, job, publish, stream_events

Start = Callable[..., AgentProcess]


async def test_handoff_across_two_agent_processes(
    redis: Redis, pg: asyncpg.Connection, agents: Start, base_env: dict[str, str]
) -> None:
    agents("worker")
    agents("finisher")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentmesh",
            "publish",
            "t:jobs",
            "--type",
            "job.created",
            "--session",
            "s-handoff",
            "--payload",
            '{"n": 7}',
            "--json",
        ],
        env=base_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    published = json.loads(out.stdout)

    finals = await eventually(lambda: stream_events(redis, "t:final"), what="job.final")
    assert len(finals) == 1
    (done,) = await stream_events(redis, "t:done")
    assert finals[0].session_id == done.session_id == "s-handoff"
    assert done.causation_id == published["event_id"]
    assert finals[0].causation_id == done.event_id
    rows = await pg.fetch("SELECT agent, input_event_id::text FROM mesh_actions ORDER BY id")
    assert [(r["agent"], r["input_event_id"]) for r in rows] == [
        ("worker", published["event_id"]),
        ("finisher", done.event_id),
    ]
    # each action also wrote its audit event to the outbox, next to the handoff; `mesh publish`
    # wrote the first event there too, under the operator's name (its PostgreSQL role)
    types = await pg.fetch("SELECT agent, type, stream FROM mesh_outbox ORDER BY id")
    assert Counter((r["agent"], r["type"]) for r in types) == Counter(
        {
            ("cli:mesh", "job.created"): 1,  # the PostgreSQL role of `mesh publish`
            ("worker", "mesh.action"): 1,
            ("worker", "job.done"): 1,
            ("finisher", "mesh.action"): 1,
            ("finisher", "job.final"): 1,
        }
    )


async def test_same_message_delivered_twice(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    env = job(1)
    wire = env.to_wire()
    # bypass publish-side dedup: the same envelope lands twice in the stream
    await redis.xadd("t:jobs", {"envelope": wire})
    await redis.xadd("t:jobs", {"envelope": wire})
    agents("worker")
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), what="drained")
    # and once more, in a later batch
    await redis.xadd("t:jobs", {"envelope": wire})
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), what="drained again")
    assert await actions(pg, "worker") == 1
    done = await stream_events(redis, "t:done")
    assert len(done) == 1 and done[0].causation_id == env.event_id
    assert int(await redis.get(f"t:runs:{env.event_id}") or 0) == 1  # not even re-run


async def _drained(redis: Redis, stream: str, group: str) -> bool:
    st = await group_state(redis, stream, group)
    return bool(st) and st["pending"] == 0 and st["lag"] == 0


async def _assert_exactly_once(redis: Redis, pg: asyncpg.Connection, sent: list[Any]) -> None:
    ids = {e.event_id for e in sent}
    rows = await pg.fetch(
        "SELECT input_event_id::text AS id, count(*) AS c FROM mesh_actions "
        "WHERE agent = 'worker' GROUP BY 1"
    )
    assert {r["id"] for r in rows} == ids, "an input has no action row"
    assert all(r["c"] == 1 for r in rows)
    done = await stream_events(redis, "t:done")
    per_cause = Counter(e.causation_id for e in done)
    assert set(per_cause) == ids, "an input has no handoff in the target stream"
    assert max(per_cause.values()) == 1, "an input was handed off twice"
    assert len(done) == len(ids)
    outbox = await pg.fetchval(
        "SELECT count(*) FROM mesh_outbox WHERE agent = 'worker' AND stream = 't:done'"
    )
    assert outbox == len(ids)


async def test_kill9_mid_batch_loses_and_doubles_nothing(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    sent = [job(i, session=f"s-{i % 50}", sleep_ms=5) for i in range(2000)]
    await publish(redis, sent)
    a = agents("worker", MESH_BATCH_SIZE="200", MESH_CONCURRENCY="100")
    await eventually(lambda: _at_least(pg, 300), timeout=60, what="some progress")
    a.kill9()
    in_flight = (await group_state(redis, "t:jobs", "worker"))["pending"]
    committed_at_kill = await actions(pg, "worker")
    assert committed_at_kill < 2000, "the kill came too late to be mid-run"
    agents("worker", MESH_BATCH_SIZE="200", MESH_CONCURRENCY="100")
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), timeout=120, what="drain")
    await _assert_exactly_once(redis, pg, sent)
    # the kill left work pending, and it was reclaimed rather than lost
    assert in_flight > 0 or committed_at_kill % 200 != 0


async def _at_least(pg: asyncpg.Connection, n: int) -> bool:
    return await actions(pg, "worker") >= n


async def _crash_at(point: str, redis: Redis, pg: asyncpg.Connection, agents: Start) -> None:
    sent = [job(i) for i in range(300)]
    await publish(redis, sent)
    a = agents("worker", MESH_CRASH_AT=point, MESH_BATCH_SIZE="100", MESH_CONCURRENCY="100")
    assert a.wait(60) == 137, a.log()
    committed = await actions(pg, "worker")
    committed_ids = {
        r["id"] for r in await pg.fetch("SELECT input_event_id::text AS id FROM mesh_actions")
    }
    handed = len(await stream_events(redis, "t:done"))
    assert committed >= 1, "a first group committed before the crash"
    if point == "after_commit":
        assert handed == 0, "crashed before any XADD"
    else:
        assert handed == committed, "crashed after XADD, before XACK"
    pending = (await group_state(redis, "t:jobs", "worker"))["pending"]
    assert pending >= committed, "nothing committed was acked"
    agents("worker")
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), timeout=60, what="drain")
    await _assert_exactly_once(redis, pg, sent)
    # the committed group was not run a second time: its redelivery found the idempotency rows
    # (handlers that were running but not committed at the crash may run again: that is allowed)
    reruns = [int(await redis.get(f"t:runs:{i}") or 0) for i in committed_ids]
    assert reruns and max(reruns) == 1


async def test_crash_between_commit_and_xadd(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    await _crash_at("after_commit", redis, pg, agents)


async def test_crash_between_xadd_and_xack(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    await _crash_at("after_publish", redis, pg, agents)


async def test_poison_goes_to_dlq_at_once(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    good = job(1)
    base = json.loads(good.to_wire())
    bad: dict[str, bytes] = {
        "malformed_json": b"{not json",
        "unknown_type": json.dumps(
            {**base, "event_id": job(2).event_id, "type": "no.such"}
        ).encode(),
        "unsupported_schema_version": json.dumps(
            {**base, "event_id": job(3).event_id, "schema_version": 99}
        ).encode(),
        "schema_violation": json.dumps(
            {**base, "event_id": job(4).event_id, "payload": {"n": "seven"}}
        ).encode(),
        "malformed_envelope": json.dumps({**base, "event_id": "not-a-uuid"}).encode(),
        "oversize": json.dumps(
            {**base, "event_id": job(5).event_id, "payload": {"n": 1, "pad": "x" * 300_000}}
        ).encode(),
    }
    for raw in bad.values():
        await redis.xadd("t:jobs", {"envelope": raw})
    await redis.xadd("t:jobs", {"wrong_field": b"1"})  # no envelope at all
    p = agents("worker")
    await eventually(lambda: _dlq_len(redis, 7), what="7 DLQ entries")
    await publish(redis, [good])
    await eventually(lambda: _at_least(pg, 1), what="good message processed")
    assert p.alive()
    letters = await dlq(redis)
    assert sorted(d["reason"] for d in letters) == sorted([*bad, "malformed_json"])
    for d in letters:
        assert d["deliveries"] == "1", "poison is not retried"
        assert d["agent"] == "worker" and d["stream"] == "t:jobs" and d["error"]
    by_reason = {d["reason"]: d for d in letters}
    assert by_reason["unknown_type"]["envelope"] == bad["unknown_type"].decode()  # verbatim
    assert await _drained(redis, "t:jobs", "worker")


async def _dlq_len(redis: Redis, n: int) -> bool:
    return int(await redis.xlen("mesh:dlq")) >= n


async def test_failing_handler_reaches_dlq_after_max_deliveries(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    bad, good = job(1, fail="always"), job(2)
    fatal = job(3, fail="nonretryable")
    await publish(redis, [bad, good, fatal])
    agents("worker", MESH_MAX_DELIVERIES="3")
    await eventually(lambda: _dlq_len(redis, 2), what="DLQ entries")
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), what="drained")
    letters = {json.loads(d["envelope"])["event_id"]: d for d in await dlq(redis)}
    assert set(letters) == {bad.event_id, fatal.event_id}
    d = letters[bad.event_id]
    assert d["reason"] == "max_deliveries" and d["deliveries"] == "3"
    assert d["error_type"] == "RuntimeError" and "always fails" in d["error"]
    assert "Traceback" in d["traceback"]
    assert d["first_failure"] < d["last_failure"]
    assert int(await redis.get(f"t:runs:{bad.event_id}") or 0) == 3
    assert letters[fatal.event_id]["reason"] == "non_retryable"
    assert int(await redis.get(f"t:runs:{fatal.event_id}") or 0) == 1
    assert await actions(pg, "worker") == 1  # only the good one


async def test_a_slow_handler_does_not_hold_back_the_others(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    slow = job(0, sleep_ms=5000)
    await publish(redis, [slow, *[job(i) for i in range(1, 21)]])  # read together
    agents("worker")
    await eventually(lambda: _at_least(pg, 20), timeout=4, what="the fast ones committed")
    assert not await pg.fetchval(
        "SELECT count(*) FROM mesh_actions WHERE input_event_id = $1::uuid", slow.event_id
    )
    assert (await group_state(redis, "t:jobs", "worker"))["pending"] == 1  # only the slow one
    await eventually(lambda: _at_least(pg, 21), timeout=15, what="the slow one")


async def test_hung_handler_is_cancelled_and_dead_lettered(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    hung = job(1, sleep_ms=60_000)
    await publish(redis, [hung, job(2)])
    agents("worker", MESH_HANDLER_TIMEOUT_S="0.5", MESH_MAX_DELIVERIES="2")
    await eventually(lambda: _dlq_len(redis, 1), timeout=30, what="DLQ entry")
    (d,) = await dlq(redis)
    assert d["reason"] == "max_deliveries" and d["error_type"] == "HandlerTimeout"
    assert d["deliveries"] == "2"
    assert await actions(pg, "worker") == 1  # the other message of the batch committed


async def test_breaker_pauses_consumption_and_resumes(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    from agentmesh.schemas import registry

    await redis.set("t:flaky-down", 1)
    calls = [registry.make("dep.call", {"n": i}, session_id="s-dep") for i in range(20)]
    p = agents("caller", MESH_BATCH_SIZE="1", MESH_MAX_DELIVERIES="50")
    await publish(redis, calls)
    # two failed calls open the breaker; then the stream is no longer read
    await eventually(lambda: _gte(redis, "t:dep-attempts", 2), what="failures")
    await asyncio.sleep(1.0)
    attempts_open = int(await redis.get("t:dep-attempts") or 0)
    state = await group_state(redis, "t:dep", "caller")
    assert state["lag"] >= 15, f"entries kept waiting in the stream while open: {state}"
    # while down, only a probe now and then gets through (one per reset timeout of 1.5 s)
    await asyncio.sleep(3.2)
    attempts_later = int(await redis.get("t:dep-attempts") or 0)
    assert attempts_later - attempts_open <= 4, "no retry burn while the breaker is open"
    await redis.delete("t:flaky-down")
    await eventually(lambda: _drained(redis, "t:dep", "caller"), timeout=30, what="resumed")
    assert await actions(pg, "caller") == 20
    assert await redis.xlen("mesh:dlq") == 0
    assert p.alive()


async def _gte(redis: Redis, key: str, n: int) -> bool:
    return int(await redis.get(key) or 0) >= n


async def test_sigterm_drains_in_flight_work(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    sent = [job(i, sleep_ms=1500) for i in range(30)]
    await publish(redis, sent)
    p = agents("worker", MESH_BATCH_SIZE="10", MESH_CONCURRENCY="10")
    await eventually(lambda: _gte(redis, "t:started", 10), what="a batch in flight")
    assert p.terminate(timeout=20) == 0
    assert await actions(pg, "worker") == 10, "the in-flight batch finished and committed"
    state = await group_state(redis, "t:jobs", "worker")
    assert state == {"pending": 0, "lag": 20}, "in-flight acked; nothing more was read"
    agents("worker", MESH_BATCH_SIZE="10", MESH_CONCURRENCY="10")
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), timeout=60, what="rest")
    await _assert_exactly_once(redis, pg, sent)


async def test_long_handler_keeps_its_claim(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    slow = job(1, sleep_ms=4500)  # three times the 1.5 s reclaim idle time
    agents("worker")
    agents("worker")
    await publish(redis, [slow])
    await eventually(lambda: _at_least(pg, 1), timeout=30, what="done")
    await asyncio.sleep(1)
    assert int(await redis.get(f"t:runs:{slow.event_id}") or 0) == 1, "handed to a 2nd consumer"


async def test_stream_deleted_under_a_running_agent(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    p = agents("worker")
    await publish(redis, [job(1)])
    await eventually(lambda: _at_least(pg, 1), what="first")
    await redis.delete("t:jobs")  # NOGROUP from now on
    await asyncio.sleep(0.5)
    await publish(redis, [job(2)])
    await eventually(lambda: _at_least(pg, 2), timeout=20, what="after NOGROUP")
    assert p.alive()
    assert "NOGROUP" not in p.log() or p.log().count("NOGROUP") < 5


async def test_postgres_restart_under_load_loses_and_doubles_nothing(
    redis: Redis, pg: asyncpg.Connection, agents: Start, stack: devstack.StackConfig
) -> None:
    sent = [job(i, sleep_ms=2) for i in range(1500)]
    await publish(redis, sent)
    p = agents("worker", MESH_BATCH_SIZE="50", MESH_MAX_DELIVERIES="2")
    await eventually(lambda: _at_least(pg, 100), timeout=60, what="progress")
    await pg.close()
    devstack.kill9(stack, "postgres")
    await asyncio.sleep(2)  # the agent keeps failing to commit meanwhile
    await asyncio.to_thread(devstack.up, stack, ("postgres",))
    fresh = await asyncpg.connect(stack.postgres_dsn)
    try:
        await eventually(lambda: _drained(redis, "t:jobs", "worker"), timeout=120, what="drain")
        assert p.alive()
        assert await redis.xlen("mesh:dlq") == 0, (
            "an unavailable database is not the message's fault"
        )
        await _assert_exactly_once(redis, fresh, sent)
        # results were kept across the outage: no handler had to run again
        runs = [int(x or 0) for x in await redis.mget([f"t:runs:{e.event_id}" for e in sent])]
        assert max(runs) == 1
    finally:
        await fresh.close()


async def test_redis_crash_and_restart_under_a_running_agent(
    redis: Redis, pg: asyncpg.Connection, agents: Start, stack: devstack.StackConfig
) -> None:
    before = [job(i) for i in range(200)]
    await publish(redis, before)
    p = agents("worker")
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), timeout=30, what="first half")
    await asyncio.sleep(1.5)  # AOF fsyncs every second: let the first half reach the disk
    devstack.kill9(stack, "redis")
    await asyncio.sleep(1.0)  # the agent sees the broker gone and backs off
    await asyncio.to_thread(devstack.up, stack, ("redis",))
    after = [job(i) for i in range(200, 400)]
    await eventually(lambda: _publish_ok(redis, after), timeout=20, what="redis back")
    await eventually(lambda: _drained(redis, "t:jobs", "worker"), timeout=60, what="second half")
    assert p.alive()
    await _assert_exactly_once(redis, pg, before + after)


async def _publish_ok(redis: Redis, envelopes: list[Any]) -> bool:
    try:
        await publish(redis, envelopes)
        return True
    except Exception:
        return False
