"""The audit log heals itself when the broker loses acknowledged records, and replay orders a
session by its outbox sequence (header `mesh-seq`) and reports events its log lacks.

Real servers. A broker "loses acknowledged records" the way a crashed Tansu on S3 does: it is
killed, the stored objects of a partition are deleted from the s3rver data dir
(`<root>/s3/<bucket>/clusters/<cluster>/topics/<topic>/partitions/<partition, 10 digits>/`:
`records/<offset>.batch` and `watermark.json`), and it is started again. It then hands out
offset 0 of that partition again, while the other partitions keep their records.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from agentmesh import devstack
from agentmesh.outbox import kafka
from agentmesh.outbox.kafka import session_hash
from agentmesh.outbox.relay import Relay
from agentmesh.outbox.replay import (
    MissingEvent,
    ReplayedEvent,
    _OutboxRow,
    causal_order,
    find_missing,
    replay_session,
)
from agentmesh.schemas import Envelope, registry
from agentmesh.schemas.audit import ACTION
from agentmesh.settings import Settings
from tests.audit_helpers import backlog, drain_outbox, event, insert, metric, read_topic
from tests.audit_helpers import settings_from as settings_of
from tests.conftest import MeshProcess, eventually
from tests.helpers import mesh

StartRelay = Callable[..., MeshProcess]
PARTITIONS = 4


def lose_partitions(stack: devstack.StackConfig, topic: str, partitions: list[int]) -> None:
    """The broker crashes and comes back without the records of these partitions."""
    devstack.kill9(stack, "kafka")
    for p in partitions:
        (found,) = (stack.root / "s3").glob(f"*/clusters/*/topics/{topic}/partitions/{p:010d}")
        shutil.rmtree(found)
    devstack.up(stack, ("kafka",))


def sessions_in(partition: int, n: int, prefix: str) -> list[str]:
    out = [f"{prefix}-{i}" for i in range(500) if session_hash(f"{prefix}-{i}") % 4 == partition]
    return out[:n]


async def outbox_order(pg: asyncpg.Connection, session: str) -> list[str]:
    rows = await pg.fetch(
        "SELECT event_id::text FROM mesh_outbox WHERE session_id = $1 ORDER BY id", session
    )
    return [r["event_id"] for r in rows]


async def _empty(pg: asyncpg.Connection) -> bool:
    return await backlog(pg) == 0


async def _published(pg: asyncpg.Connection, n: int) -> bool:
    done = await pg.fetchval("SELECT count(*) FROM mesh_outbox WHERE published_at IS NOT NULL")
    return int(done) >= n


async def _all_in_kafka(s: Settings, pg: asyncpg.Connection) -> bool:
    """Every outbox row is marked published and its event is in the topic."""
    if await backlog(pg):
        return False
    in_kafka = {dict(r.headers)["event_id"].decode() for r in await read_topic(s)}
    rows = await pg.fetch("SELECT event_id::text FROM mesh_outbox")
    return {r["event_id"] for r in rows} <= in_kafka


async def heal_events(s: Settings) -> list[dict[str, Any]]:
    rep = await replay_session(s, "operator")
    return [
        e.envelope.payload
        for e in rep.events
        if e.envelope.type == "mesh.operator" and e.envelope.payload["action"] == "audit.heal"
    ]


async def test_relay_resends_what_the_broker_lost_by_itself_in_several_partitions(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    audit_env: dict[str, str],
    relays: StartRelay,
) -> None:
    s = settings_of(audit_env)
    port = devstack.free_port()
    relay = relays(MESH_HTTP_PORT=str(port))
    lost = [1, 2]
    sessions = [x for p in range(PARTITIONS) for x in sessions_in(p, 3, "heal")]
    await insert(pg, [event(x, k) for k in range(8) for x in sessions])
    await eventually(lambda: _empty(pg), timeout=60, what="first rows published")
    acked = {
        r["kafka_partition"]: r["n"]
        for r in await pg.fetch(
            """SELECT kafka_partition, count(*) AS n FROM mesh_outbox
               WHERE kafka_partition = ANY($1::int[]) GROUP BY 1""",
            lost,
        )
    }
    assert set(acked) == set(lost) and all(acked.values())

    lose_partitions(stack, s.audit_topic, lost)
    # the mesh goes on: new rows for every session, in the lost partitions too
    await insert(pg, [event(x, k) for k in range(8, 12) for x in sessions])

    # no operator command: the relay sees offset 0 handed out again and re-sends by itself
    await eventually(
        lambda: _all_in_kafka(s, pg), timeout=90, interval=1, what="every row in Kafka again"
    )
    assert await metric(port, "mesh_relay_healed_rows_total") == sum(acked.values())
    assert await metric(port, "mesh_relay_offset_regressions_total") == len(lost)
    log = relay.log()
    assert log.count("the broker lost records it had acknowledged") == len(lost), log[-3000:]

    # the heal is in the audit log: who (the relay), what, how much
    heals = await eventually(
        lambda: _all_of(heal_events(s), len(lost)), what="the heal events in the log"
    )
    assert sorted(h["detail"]["partition"] for h in heals) == lost
    for h in heals:
        # who: the relay's PostgreSQL role (the stack's one role here); its name, as it said
        assert h["operator"] == "mesh" and h["detail"]["claimed_by"].startswith("relay:")
        assert h["detail"]["lost_from"] == 0
        assert h["detail"]["rows"] == acked[h["detail"]["partition"]]

    # every session replays complete, in the outbox's order, through a trustworthy index
    # (whether the relay found the loss idle, before the new rows, or on sending them, after
    # which Kafka holds newer records before the re-sent older ones)
    for x in sessions:
        rep = await replay_session(s, x)
        assert [e.envelope.event_id for e in rep.events] == await outbox_order(pg, x), x
        assert rep.missing == [] and rep.used_index and not rep.stale_index, x
    for x in (sessions_in(lost[0], 1, "heal")[0], sessions_in(lost[1], 1, "heal")[0]):
        out = await asyncio.to_thread(mesh, audit_env, "replay", x, "--json")
        assert out.returncode == 0, out.stderr
        got = [json.loads(line)["event_id"] for line in out.stdout.splitlines()]
        assert got == await outbox_order(pg, x)
    assert relay.alive()


async def _all_of(found: Any, n: int) -> Any:
    got = await found
    return got if len(got) == n else None


async def test_a_loss_detected_mid_batch_drops_the_rounds_own_lost_acks(
    pg: asyncpg.Connection, stack: devstack.StackConfig, audit_env: dict[str, str]
) -> None:
    """The broker loses the partition between two record batches of one round: the round's
    first batch was acked at offsets that are gone. Those rows must not be marked."""
    s = settings_of(audit_env)
    (x,) = sessions_in(3, 1, "mid")
    relay = Relay(s)
    await relay.start()
    try:
        await insert(pg, [event(x, k) for k in range(6)])
        while await backlog(pg):
            await relay.rebalance()
            await relay.round()
        # ~200 KB each: two per record batch, so one round sends this partition two batches
        pad = "x" * 200_000
        big = [
            Envelope(type="job.done", session_id=x, source="loadgen", payload={"n": k, "p": pad})
            for k in range(6, 10)
        ]
        await insert(pg, big)
        producer = await relay._ensure_producer()
        send = producer.send_batch
        calls: list[int] = []

        async def send_batch(*a: Any, **kw: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:  # after the first batch's ack: the broker crashes, loses p
                await asyncio.to_thread(lose_partitions, stack, s.audit_topic, [3])
            return await send(*a, **kw)

        producer.send_batch = send_batch
        res = await relay.round()
        assert len(calls) == 2, "the partition stops after the batch that came back at 0"
        states = await pg.fetch(
            """SELECT (envelope::jsonb->'payload'->>'n')::int AS n, published_at IS NOT NULL
                      AS published, kafka_offset FROM mesh_outbox WHERE session_id = $1
               ORDER BY id""",
            x,
        )
        # rows 0-5 and the first batch (6, 7) were lost: unpublished again; 8, 9 sit at 0, 1
        assert [(r["n"], r["published"]) for r in states] == [(k, k >= 8) for k in range(10)]
        assert [r["kafka_offset"] for r in states[8:]] == [0, 1]
        healed = relay.metrics.registry.get_sample_value("mesh_relay_healed_rows_total")
        assert res.published == 2 and healed == 8
        assert relay._lost == {}
        while await backlog(pg):
            await relay.round()
    finally:
        await relay.close()
    rep = await replay_session(s, x)
    assert [e.envelope.payload["n"] for e in rep.events] == list(range(10))
    assert rep.missing == [] and not rep.stale_index


async def test_replay_orders_a_session_by_its_sequence_and_keeps_each_event_once(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    """Copies written later sit at lower offsets than the events before them (as after a lost
    partition healed, or a republish): replay follows the `mesh-seq` header, not offsets."""
    s = settings_of(audit_env)
    await kafka.ensure_topic(s)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    envs = [
        registry.make("job.done", {"n": k}, session_id="seq-1", source="loadgen",
                      created_at=t0 + timedelta(seconds=k))
        for k in range(6)
    ]  # fmt: skip
    old = [
        registry.make("job.done", {"n": 100 + k}, session_id="seq-1", source="old-relay",
                      created_at=t0 - timedelta(days=1, seconds=-k))
        for k in range(2)
    ]  # fmt: skip

    def record(e: Envelope, seq: int | None) -> list[tuple[str, bytes]]:
        h = [("event_id", e.event_id.encode()), ("session_id", e.session_id.encode())]
        return h if seq is None else [*h, (kafka.SEQ_HEADER, str(seq).encode())]

    # log order: 4, 5, old 100 (no header), 0..5 again, old 101 (no header)
    order = [(envs[4], 14), (envs[5], 15), (old[0], None)]
    order += [(e, 10 + k) for k, e in enumerate(envs)] + [(old[1], None)]
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for e, seq in order:
            await producer.send_and_wait(
                s.audit_topic, e.to_wire(), key=b"seq-1", headers=record(e, seq)
            )
    finally:
        await producer.stop()

    rep = await replay_session(s, "seq-1")
    ns = [e.envelope.payload["n"] for e in rep.events]
    # records older relays wrote keep their log order and come by created_at: first here
    assert ns == [100, 101, 0, 1, 2, 3, 4, 5]
    assert rep.duplicates == 2 and [e.copies for e in rep.events] == [1, 1, 1, 1, 1, 1, 2, 2]
    assert [e.seq for e in rep.events] == [None, None, 10, 11, 12, 13, 14, 15]
    assert rep.missing == []


def _replayed(envs: list[Envelope]) -> list[ReplayedEvent]:
    return [ReplayedEvent(e, 0, i, seq=i + 1) for i, e in enumerate(envs)]


def test_causal_order_sorts_by_sequence_and_merges_unsequenced_by_time() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    mk = [
        registry.make("job.done", {"n": k}, session_id="u", created_at=t0 + timedelta(seconds=k))
        for k in range(4)
    ]
    events = [
        ReplayedEvent(mk[3], 0, 0, seq=9),
        ReplayedEvent(mk[2], 0, 1, seq=None),
        ReplayedEvent(mk[0], 0, 2, seq=None),
        ReplayedEvent(mk[1], 0, 3, seq=7),
    ]
    # the unsequenced keep their log order (2 before 0), interleaved by created_at
    assert [e.envelope.payload["n"] for e in causal_order(events)] == [1, 2, 0, 3]


def _action(agent: str, cause: Envelope, emitted: list[Envelope]) -> Envelope:
    return registry.make(
        ACTION,
        {"agent": agent, "input_event_id": cause.event_id, "input_type": cause.type,
         "emitted": [e.event_id for e in emitted]},
        session_id=cause.session_id, causation_id=cause.event_id, source=agent,
    )  # fmt: skip


def test_find_missing_from_the_log_alone_and_with_the_outbox() -> None:
    outside = registry.make("job.created", {"n": 0}, session_id="g")  # XADDed from outside
    done = registry.make("job.done", {"n": 0}, session_id="g", causation_id=outside.event_id)
    worked = _action("worker", outside, [done])
    final = registry.make("job.final", {"n": 0}, session_id="g", causation_id=done.event_id)
    finished = _action("finisher", done, [final])
    edited = registry.make("job.created", {"n": 1}, session_id="g")  # a DLQ edit, by hand
    op = registry.make(
        "mesh.operator",
        {"operator": "o", "action": "dlq.edit", "reason": "", "target": "1-0",
         "event_id": edited.event_id},
        session_id="g", causation_id=edited.event_id,
    )  # fmt: skip
    redone = _action("worker", edited, [])
    # the first event's cause, an operator's target and what it put on a stream by hand may
    # never have been in the log: the log alone does not call them missing
    assert find_missing(_replayed([worked, done, finished, final, op, redone])) == []

    missing = find_missing(_replayed([worked, finished, final]))  # done lost
    assert [(m.event_id, m.why, m.named_by, m.in_outbox) for m in missing] == [
        (done.event_id, "emitted", worked.event_id, None)
    ]
    assert done.event_id in missing[0].describe()
    missing = find_missing(_replayed([outside, finished, final]))  # worked and done lost
    assert [(m.event_id, m.why, m.named_by) for m in missing] == [
        (done.event_id, "cause", finished.event_id)
    ]

    # with the outbox: a row still unpublished is on its way; a published one is missing even
    # if nothing in the log names it; a cause the outbox never held is not
    rows = {
        done.event_id: _OutboxRow("job.done", "pending"),
        worked.event_id: _OutboxRow(ACTION, "here"),
        finished.event_id: _OutboxRow(ACTION, "here"),
        final.event_id: _OutboxRow("job.final", "here"),
    }
    assert find_missing(_replayed([worked, finished]), rows) == [
        MissingEvent(final.event_id, "emitted", finished.event_id, "job.final", True)
    ]
    assert find_missing(_replayed([worked, final]), rows) == [
        MissingEvent(finished.event_id, "published", None, ACTION, True)
    ]
    pruned = find_missing(_replayed([worked, final]), {})
    assert [(m.event_id, m.in_outbox) for m in pruned] == [(done.event_id, False)]
    assert "pruned" in pruned[0].describe()


async def test_replay_reports_an_event_its_log_lacks_until_it_is_republished(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    s = settings_of(audit_env)
    created = registry.make("job.created", {"n": 1}, session_id="gap-1")
    done = registry.make(
        "job.done", {"n": 1}, session_id="gap-1", causation_id=created.event_id, source="worker"
    )
    worked = registry.make(
        ACTION,
        {"agent": "worker", "input_event_id": created.event_id, "input_type": "job.created",
         "emitted": [done.event_id]},
        session_id="gap-1", causation_id=created.event_id, source="worker",
    )  # fmt: skip
    final = registry.make(
        "job.final", {"n": 1}, session_id="gap-1", causation_id=done.event_id, source="finisher"
    )
    await insert(pg, [created, worked, done, final])
    # Kafka acked job.done, then lost it: its row says published, the log does not have it
    await pg.execute(
        """UPDATE mesh_outbox SET published_at = now(), kafka_topic = $1, kafka_partition = $2,
                  kafka_offset = 0 WHERE event_id = $3""",
        s.audit_topic,
        session_hash("gap-1") % PARTITIONS,
        done.event_id,
    )
    await drain_outbox(s, pg)

    out = await asyncio.to_thread(mesh, audit_env, "replay", "gap-1")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("missing: ")]
    assert len(lines) == 1 and done.event_id in lines[0] and "(job.done)" in lines[0]
    assert "mesh outbox republish --session gap-1" in out.stderr
    assert worked.event_id in out.stdout or "job.final" in out.stdout  # the timeline is shown
    out = await asyncio.to_thread(mesh, audit_env, "replay", "gap-1", "--json")
    assert out.returncode == 1
    last = json.loads(out.stdout.splitlines()[-1])
    assert [m["event_id"] for m in last["missing"]] == [done.event_id]
    assert last["repair"] == "mesh outbox republish --session gap-1"

    out = await asyncio.to_thread(mesh, audit_env, "outbox", "republish", "--session", "gap-1")
    assert out.returncode == 0, out.stderr
    out = await asyncio.to_thread(mesh, audit_env, "replay", "gap-1")
    assert out.returncode == 0, out.stderr
    await drain_outbox(s, pg)  # the republish's own audit row, if it is not sent yet
    out = await asyncio.to_thread(mesh, audit_env, "replay", "gap-1", "--json")
    assert out.returncode == 0, out.stderr
    got = [json.loads(line)["event_id"] for line in out.stdout.splitlines()]
    # the re-sent job.done sits after job.final in Kafka; replay puts it back before it
    assert got == await outbox_order(pg, "gap-1")
    assert got[:4] == [created.event_id, worked.event_id, done.event_id, final.event_id]


async def test_replay_through_an_index_past_the_partitions_end_scans_instead(
    pg: asyncpg.Connection, stack: devstack.StackConfig, audit_env: dict[str, str]
) -> None:
    """The broker lost a partition and no relay has written to it since: the index points past
    its end. Replay must not fail on it: it scans, and says what is missing and how to repair."""
    s = settings_of(audit_env)
    x, other = sessions_in(2, 2, "stale")
    await insert(pg, [event(y, k) for k in range(5) for y in (x, other)])
    await drain_outbox(s, pg)
    lose_partitions(stack, s.audit_topic, [2])

    rep = await replay_session(s, x)
    assert rep.stale_index and not rep.used_index and rep.events == []
    assert [m.event_id for m in rep.missing] == await outbox_order(pg, x)
    assert {m.why for m in rep.missing} == {"published"}
    out = await asyncio.to_thread(mesh, audit_env, "replay", x)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len([ln for ln in out.stderr.splitlines() if ln.startswith("missing: ")]) == 5
    assert f"mesh outbox republish --session {x}" in out.stderr

    # the republish runs a relay of its own: it sees offset 0 handed out again, and heals the
    # whole partition (the other session's rows too), not only what it was asked for
    out = await asyncio.to_thread(mesh, audit_env, "outbox", "republish", "--session", x)
    assert out.returncode == 0, out.stderr
    out = await asyncio.to_thread(mesh, audit_env, "replay", x)
    assert out.returncode == 0, out.stderr
    await drain_outbox(s, pg)  # what the republish healed beyond its session, and its own row
    out = await asyncio.to_thread(mesh, audit_env, "replay", x, "--json")
    assert out.returncode == 0, out.stderr
    got = [json.loads(ln)["event_id"] for ln in out.stdout.splitlines()]
    assert got == await outbox_order(pg, x)
    assert await metric_of_heals(s) == 1
    rep = await replay_session(s, other)
    assert [e.envelope.event_id for e in rep.events] == await outbox_order(pg, other)
    assert rep.missing == [] and rep.used_index and not rep.stale_index


async def metric_of_heals(s: Settings) -> int:
    """How many heals the audit log records."""
    return len(await heal_events(s))


async def test_an_idle_relay_heals_a_partition_nobody_writes_to_any_more(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    audit_env: dict[str, str],
    relays: StartRelay,
) -> None:
    """The loss is found without new traffic: the idle relay compares the partition's end
    with what it had acked there (before this, only the next send to it would notice)."""
    s = settings_of(audit_env)
    port = devstack.free_port()
    relays(MESH_HTTP_PORT=str(port))
    sessions = [x for p in range(PARTITIONS) for x in sessions_in(p, 2, "idle")]
    await insert(pg, [event(x, k) for k in range(5) for x in sessions])
    await eventually(lambda: _empty(pg), timeout=60, what="rows published")
    lose_partitions(stack, s.audit_topic, [3])  # and nothing is written afterwards

    await eventually(
        lambda: _all_in_kafka(s, pg), timeout=60, interval=1, what="the lost partition re-sent"
    )
    assert await metric(port, "mesh_relay_healed_rows_total") > 0
    for x in sessions:
        rep = await replay_session(s, x)
        assert [e.envelope.event_id for e in rep.events] == await outbox_order(pg, x), x
