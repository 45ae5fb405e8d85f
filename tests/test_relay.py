"""The outbox relay against real PostgreSQL and a real Kafka-protocol broker (Tansu on S3).

Every test writes outbox rows with a per-session sequence number, then reads the whole topic
back: each row must be there, and each session's first copies must be in sequence order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from agentmesh import devstack
from agentmesh.outbox.relay import Relay
from agentmesh.schemas import registry
from tests.audit_helpers import (
    LoadGen,
    backlog,
    drain_outbox,
    event,
    first_copies,
    insert,
    metric,
    read_topic,
    settings_from,
)
from tests.conftest import MeshProcess, eventually

StartRelay = Callable[..., MeshProcess]


def assert_in_order(order: dict[str, list[int]], expected: dict[str, int]) -> None:
    """Every session's events are all there, first copies in sequence order."""
    assert set(order) == {s for s, n in expected.items() if n}, "sessions missing from Kafka"
    for session, n in expected.items():
        if n:
            assert order[session] == list(range(n)), f"{session} out of order or incomplete"


async def run_relay_until_empty(relay: Relay, pg: asyncpg.Connection) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: _empty(pg), timeout=30, what="outbox drained")
    finally:
        stop.set()
        await task


async def _empty(pg: asyncpg.Connection) -> bool:
    return await backlog(pg) == 0


async def test_relay_publishes_rows_with_key_headers_and_recorded_offsets(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    s = settings_from(audit_env)
    envs = [event(f"s-{i % 5}", i // 5) for i in range(50)]
    await insert(pg, envs)
    await drain_outbox(s, pg)

    records = await read_topic(s)
    assert len(records) == 50  # no crash: every row exactly once
    assert_in_order(first_copies(records), {f"s-{i}": 10 for i in range(5)})
    by_id = {e.event_id: e for e in envs}
    seq = {
        r["event_id"]: str(r["id"])
        for r in await pg.fetch("SELECT id, event_id::text FROM mesh_outbox")
    }
    for r in records:
        h = {k: v.decode() for k, v in r.headers}
        env = by_id[h["event_id"]]
        assert r.key == env.session_id.encode()
        assert h == {
            "event_id": env.event_id,
            "type": "job.done",
            "schema_version": "1",
            "session_id": env.session_id,
            "agent": "loadgen",
            "causation_id": "",
            "mesh-seq": seq[env.event_id],  # the outbox row's id: the session's commit order
            "mesh-lease": "1",  # the partition's lease epoch: its first owner
        }
    # the relay recorded where each row went, and one index row per session
    rows = await pg.fetch("SELECT event_id::text, kafka_partition, kafka_offset FROM mesh_outbox")
    placed = {(r.partition, r.offset): dict(r.headers)["event_id"].decode() for r in records}
    assert {(r["kafka_partition"], r["kafka_offset"]): r["event_id"] for r in rows} == placed
    index = await pg.fetch("SELECT session_id, records FROM mesh_audit_index")
    assert sorted((r["session_id"], r["records"]) for r in index) == [
        (f"s-{i}", 10) for i in range(5)
    ]


async def test_late_committing_transaction_with_low_ids_is_still_published(
    pg: asyncpg.Connection, stack: devstack.StackConfig, audit_env: dict[str, str]
) -> None:
    """A transaction takes outbox ids first but commits last: a relay reading "id > last id"
    would skip it for good."""
    s = settings_from(audit_env)
    late = await asyncpg.connect(stack.postgres_dsn)
    relay = Relay(s)
    await relay.start()
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        tx = late.transaction()
        await tx.start()
        await insert(late, [event("late", 0), event("late", 1)])  # ids 1, 2: uncommitted
        await insert(pg, [event("early", i) for i in range(3)])  # ids 3..5: committed
        published = "SELECT count(*) FROM mesh_outbox WHERE published_at IS NOT NULL"
        await eventually(lambda: _count(pg, published, 3), what="higher ids published")
        await tx.commit()
        await eventually(lambda: _count(pg, published, 5), what="the late rows published")
    finally:
        stop.set()
        await task
        await relay.close()
        await late.close()
    ids = await pg.fetch("SELECT id FROM mesh_outbox WHERE session_id = 'late' ORDER BY id")
    assert [r["id"] for r in ids] == [1, 2]  # they did hold the lowest ids
    assert_in_order(first_copies(await read_topic(s)), {"late": 2, "early": 3})


async def _count(pg: asyncpg.Connection, sql: str, n: int) -> bool:
    return int(await pg.fetchval(sql)) == n


async def test_relay_killed_after_ack_before_mark_duplicates_carry_the_same_event_id(
    pg: asyncpg.Connection, audit_env: dict[str, str], relays: StartRelay
) -> None:
    s = settings_from(audit_env)
    await insert(pg, [event(f"s-{i % 4}", i // 4) for i in range(40)])
    crashing = relays(MESH_CRASH_AT="relay_after_ack")
    assert await asyncio.to_thread(crashing.wait, 60) == 137
    assert await backlog(pg) == 40  # Kafka has them, the outbox does not know
    first = await read_topic(s)
    assert len(first) == 40

    relays()
    await eventually(lambda: _empty(pg), what="second relay drained the outbox")
    records = await read_topic(s)
    ids = Counter(dict(r.headers)["event_id"] for r in records)
    assert len(records) == 80 and set(ids.values()) == {2}  # every event twice, same id
    assert_in_order(first_copies(records), {f"s-{i}": 10 for i in range(4)})


async def test_kafka_down_backlog_grows_on_metrics_then_drains_in_order(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    audit_env: dict[str, str],
    relays: StartRelay,
) -> None:
    s = settings_from(audit_env)
    port = devstack.free_port()
    relay = relays(MESH_HTTP_PORT=str(port))
    pool = await asyncpg.create_pool(stack.postgres_dsn, min_size=1, max_size=2)
    load = LoadGen(pool, sessions=12)
    load.start()
    try:
        await eventually(lambda: _published_some(pg), what="relay publishing")
        devstack.kill9(stack, "kafka")
        # Down for longer than the producer's request timeout (5 s here): Tansu restarts a
        # partition it has not been asked about at offset 0, so a produce retried straight
        # into a restarted broker would overwrite acked records (see kafka_touch_partitions).
        await asyncio.sleep(3)
        grown = await eventually(
            lambda: _backlog_over(port, 300), timeout=30, what="backlog on /metrics"
        )
        assert grown >= 300
        assert await metric(port, "mesh_outbox_backlog_oldest_seconds") > 1
        await asyncio.sleep(4)
        devstack.up(stack, ("kafka",))
        await asyncio.sleep(1)
    finally:
        await load.stop()
        await pool.close()
    await eventually(lambda: _empty(pg), timeout=60, what="backlog drained after restart")
    await eventually(lambda: _backlog_over(port, -1, equal=0), what="/metrics backlog back to 0")
    order = first_copies(await read_topic(s))
    assert_in_order(order, dict(load.seq))
    assert await metric(port, "mesh_relay_offset_regressions_total") == 0
    assert "postgres unavailable" not in relay.log()  # a Kafka outage is not taken for one


async def _published_some(pg: asyncpg.Connection) -> bool:
    n = await pg.fetchval("SELECT count(*) FROM mesh_outbox WHERE published_at IS NOT NULL")
    return int(n) > 100


async def _backlog_over(port: int, n: int, equal: int | None = None) -> float | None:
    value = await metric(port, "mesh_outbox_backlog_rows")
    if equal is not None:
        return value == equal or None
    return value if value > n else None


async def test_two_relays_share_slots_without_publishing_a_row_twice(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    audit_env: dict[str, str],
    relays: StartRelay,
) -> None:
    s = settings_from(audit_env)
    ports = [devstack.free_port(), devstack.free_port()]
    relays(MESH_HTTP_PORT=str(ports[0]))
    pool = await asyncpg.create_pool(stack.postgres_dsn, min_size=1, max_size=2)
    load = LoadGen(pool, sessions=30)
    load.start()
    try:
        await asyncio.sleep(1.5)
        relays(MESH_HTTP_PORT=str(ports[1]))  # joins under load: slots are handed over
        await eventually(
            lambda: _slots_shared(ports), timeout=30, what="partitions shared 2/2 by two relays"
        )
        await asyncio.sleep(3)
    finally:
        await load.stop()
        await pool.close()
    await eventually(lambda: _empty(pg), timeout=60, what="outbox drained")
    records = await read_topic(s)
    ids = Counter(dict(r.headers)["event_id"] for r in records)
    assert len(records) == load.written and max(ids.values()) == 1  # no row sent twice
    assert_in_order(first_copies(records), dict(load.seq))
    sent = [await metric(p, "mesh_relay_published_total") for p in ports]
    assert all(n > 0 for n in sent) and sum(sent) == load.written


async def _slots_shared(ports: list[int]) -> bool:
    owned = [await metric(p, "mesh_relay_slots_owned") for p in ports]
    return owned == [2.0, 2.0]


async def test_relay_killed_under_load_the_other_takes_over_in_order(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    audit_env: dict[str, str],
    relays: StartRelay,
) -> None:
    s = settings_from(audit_env)
    victim = relays()
    relays()
    pool = await asyncpg.create_pool(stack.postgres_dsn, min_size=1, max_size=2)
    load = LoadGen(pool, sessions=20)
    load.start()
    try:
        await asyncio.sleep(2)
        victim.kill9()
        await asyncio.sleep(2)
    finally:
        await load.stop()
        await pool.close()
    await eventually(lambda: _empty(pg), timeout=60, what="survivor drained every slot")
    records = await read_topic(s)
    assert len({dict(r.headers)["event_id"] for r in records}) == load.written
    assert_in_order(first_copies(records), dict(load.seq))


async def test_relay_with_other_slot_count_refuses_to_start(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    from agentmesh.outbox.relay import SlotConfigMismatch

    first = Relay(settings_from(audit_env))
    await first.start()
    try:
        await first.prepare()
        s6 = settings_from(audit_env, audit_topic=f"t{time.time_ns()}", kafka_partitions=6)
        other = Relay(s6)
        await other.start()
        with pytest.raises(SlotConfigMismatch, match=r"share 4 partitions but .* has 6"):
            await other.prepare()
        await other.close()
    finally:
        await first.close()


async def test_prune_deletes_published_rows_past_retention_only(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    s = settings_from(audit_env, outbox_retention_s=0.5)
    await insert(pg, [event("old", i) for i in range(5)])
    relay = Relay(s)
    await relay.start()
    try:
        await run_relay_until_empty(relay, pg)
        await insert(pg, [event("new", 0)])  # unpublished: never pruned
        await asyncio.sleep(0.6)
        assert await relay.prune() == 5
        left = await pg.fetch("SELECT session_id, published_at FROM mesh_outbox")
        assert [(r["session_id"], r["published_at"]) for r in left] == [("new", None)]
    finally:
        await relay.close()
    index = await pg.fetchval("SELECT records FROM mesh_audit_index WHERE session_id = 'old'")
    assert index == 5  # the offset index outlives the pruned rows


async def test_topic_is_created_with_configured_partitions_and_retention(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    s = settings_from(audit_env, kafka_partitions=3, kafka_retention_ms=-1)
    relay = Relay(s)
    await relay.start()
    try:
        await relay.prepare()
        assert relay.slots == 3
    finally:
        await relay.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        (topic,) = await admin.describe_topics([s.audit_topic])
        assert len(topic["partitions"]) == 3
        (resp,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.audit_topic)]
        )
        entries = {e[0]: e[1] for e in resp.resources[0][4]}
        assert entries["retention.ms"] == "-1"
    finally:
        await admin.close()


async def test_notify_wakes_the_relay_long_before_its_poll_interval(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    s = settings_from(audit_env, relay_poll_interval_s=60)
    relay = Relay(s)
    await relay.start()
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: _owns_all(relay), what="relay owns its partitions")
        await asyncio.sleep(0.5)  # idle now, waiting up to 60 s for a NOTIFY
        started = time.monotonic()
        await insert(pg, [event("wake", 0)])
        await eventually(lambda: _empty(pg), timeout=10, what="published after NOTIFY")
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        await task
        await relay.close()


async def _owns_all(relay: Relay) -> bool:
    return relay.slots > 0 and len(relay.owned) == relay.slots


async def test_postgres_killed_under_the_relay_it_recovers_without_loss_or_reordering(
    stack: devstack.StackConfig, audit_env: dict[str, str], relays: StartRelay
) -> None:
    s = settings_from(audit_env)
    pg = await asyncpg.connect(stack.postgres_dsn)
    await pg.execute("TRUNCATE mesh_outbox, mesh_audit_index, mesh_relay_config RESTART IDENTITY")
    await insert(pg, [event(f"pg-{i % 10}", i // 10) for i in range(3000)])
    relay = relays(MESH_RELAY_BATCH_SIZE="100")
    await eventually(lambda: _published_over(pg, 200), what="relay publishing")
    await pg.close()
    devstack.kill9(stack, "postgres")  # mid-publishing: marks and the lock connection die
    await asyncio.sleep(1)
    await asyncio.to_thread(devstack.up, stack, ("postgres",))
    pg = await asyncpg.connect(stack.postgres_dsn)
    try:
        await insert(pg, [event(f"pg-{i % 10}", 300 + i // 10) for i in range(1000)])
        await eventually(lambda: _empty(pg), timeout=60, what="drained after the restart")
        assert relay.alive()
        assert "postgres unavailable" in relay.log()
        records = await read_topic(s)
        assert len({dict(r.headers)["event_id"] for r in records}) == 4000
        assert_in_order(first_copies(records), {f"pg-{i}": 400 for i in range(10)})
    finally:
        await pg.close()


async def _published_over(pg: asyncpg.Connection, n: int) -> bool:
    published = await pg.fetchval("SELECT count(*) FROM mesh_outbox WHERE published_at IS NOT NULL")
    return int(published) > n


async def test_a_large_backlog_drains_exactly_once_with_pipelined_marks(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    """Full rounds leave their mark running while the next round reads and sends: the next
    round must not pick up the rows still being marked."""
    s = settings_from(audit_env, relay_batch_size=500)
    await insert(pg, [event(f"big-{i % 40}", i // 40) for i in range(8000)])
    await drain_outbox(s, pg)
    records = await read_topic(s)
    assert len(records) == 8000  # nothing sent twice
    assert_in_order(first_copies(records), {f"big-{i}": 200 for i in range(40)})


async def test_rounds_read_ahead_under_a_backlog_and_a_failed_round_keeps_order(
    pg: asyncpg.Connection, stack: devstack.StackConfig, audit_env: dict[str, str]
) -> None:
    """Under a backlog the next round's rows are read while the sends wait for acks; when a
    round fails (its broker connection stalls past the request timeout) those rows are
    dropped, so the failed round's unsent rows still go first."""
    from tests.kafka_proxy import KafkaProxy

    host, port = stack.kafka_bootstrap.rsplit(":", 1)
    proxy = KafkaProxy(host, int(port))
    await proxy.start()
    s = settings_from(audit_env, relay_batch_size=300)
    s_relay = settings_from(
        audit_env, relay_batch_size=300, kafka_bootstrap=proxy.bootstrap,
        kafka_touch_partitions=False,  # the sends are its only Kafka requests: they fail
    )  # fmt: skip
    big = "x" * 20_000  # 25 rows fill a record batch: several batches a partition a round
    await insert(pg, [registry.make("job.created", {"n": i // 30, "fail": big},
                                    session_id=f"ra-{i % 30}") for i in range(1200)])  # fmt: skip
    relay = Relay(s_relay)
    await relay.start()
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: _published_over(pg, 0), what="relay publishing")
        proxy.stall()
        await eventually(lambda: _failed_send(relay), timeout=30, what="a send failed")
        proxy.resume()
        await eventually(lambda: _empty(pg), timeout=90, what="drained after the stall")
    finally:
        stop.set()
        await task
        await relay.close()
        await proxy.close()
    assert relay.metrics.read_ahead._value.get() > 0
    records = await read_topic(s)
    assert len({dict(r.headers)["event_id"] for r in records}) == 1200
    assert_in_order(first_copies(records), {f"ra-{i}": 40 for i in range(30)})


async def _failed_send(relay: Relay) -> bool:
    return bool(relay.metrics.send_failures._value.get() > 0)
