"""End-to-end checks of agentmesh.devstack: real servers on loopback, in a tmp dir.

The devstack calls are blocking (subprocess + sleeps), so the async tests run them in a
thread; the client checks use the same async libraries as the project.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agentmesh import devstack
from agentmesh.devstack import StackConfig, StackError
from agentmesh.devstack.config import S3_BUCKET


def _proc_table() -> dict[int, tuple[str, int]]:
    """pid -> (state, ppid) for every process, from /proc."""
    table: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        table[int(entry.name)] = (fields[0], int(fields[1]))
    return table


def _with_descendants(pids: set[int]) -> set[int]:
    """pids plus all their descendants (PostgreSQL backends, forked helpers)."""
    table = _proc_table()
    result = set(pids)
    grew = True
    while grew:
        grew = False
        for pid, (_, ppid) in table.items():
            if ppid in result and pid not in result:
                result.add(pid)
                grew = True
    return result


def _running(pid: int) -> bool:
    state = _proc_table().get(pid)
    return state is not None and state[0] not in ("Z", "X")


def _stack_pids(cfg: StackConfig) -> set[int]:
    pids = set()
    for name in ("redis", "postgres", "s3", "kafka"):
        try:
            pids.add(int(cfg.pid_file(name).read_text()))
        except (OSError, ValueError):
            pass
    return _with_descendants(pids)


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[StackConfig]:
    """A stack config on free ports under tmp_path; always torn down, even on failure."""
    redis_port, pg_port, kafka_port, s3_port = devstack.free_ports(4)
    config = StackConfig(
        root=tmp_path / "stack",
        redis_port=redis_port,
        pg_port=pg_port,
        kafka_port=kafka_port,
        s3_port=s3_port,
    )
    yield config
    devstack.down(config, ("redis", "postgres", "kafka"), timeout=10)


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        assert topic in await admin.list_topics()
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    # Tansu has no idempotent producer support.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def _consume_all(bootstrap: str, topic: str, want: bytes, wait_s: float = 15) -> list[bytes]:
    """Read topic from the start until want shows up (or wait_s runs out)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    seen: list[bytes] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while want not in seen and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            seen += [rec.value for recs in batches.values() for rec in recs if rec.value]
    finally:
        await consumer.stop()
    return seen


async def test_full_stack_up_status_down(cfg: StackConfig) -> None:
    statuses = await asyncio.to_thread(devstack.up, cfg)
    assert [s.name for s in statuses] == ["redis", "postgres", "kafka"]
    assert all(s.running and s.pid for s in statuses), statuses
    kafka = statuses[2]
    assert "s3://" in kafka.detail, kafka.detail

    r = aioredis.from_url(cfg.redis_url)
    try:
        assert await r.ping()
    finally:
        await r.aclose()

    conn = await asyncpg.connect(cfg.postgres_dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == cfg.pg_db
    finally:
        await conn.close()

    topic, value = f"t-{uuid.uuid4().hex[:8]}", b"hello-devstack"
    await _create_topic(cfg.kafka_bootstrap, topic)
    await _produce(cfg.kafka_bootstrap, topic, value)
    assert value in await _consume_all(cfg.kafka_bootstrap, topic, value)

    again = await asyncio.to_thread(devstack.up, cfg)
    assert [s.pid for s in again] == [s.pid for s in statuses], "second up() must be a no-op"

    pids = _stack_pids(cfg)
    assert len(pids) >= 4  # redis, postmaster (+ its helpers), s3rver, tansu
    await asyncio.to_thread(devstack.down, cfg)
    assert not [p for p in pids if _running(p)], "processes left after down()"
    assert not any(s.running for s in devstack.status(cfg))
    await asyncio.to_thread(devstack.down, cfg)  # idempotent


async def test_kafka_data_survives_broker_restart(cfg: StackConfig) -> None:
    first = await asyncio.to_thread(devstack.up, cfg, ["kafka"])
    assert [s.name for s in first] == ["kafka"] and first[0].running, first
    topic, value = f"durable-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4()}".encode()
    await _create_topic(cfg.kafka_bootstrap, topic)
    await _produce(cfg.kafka_bootstrap, topic, value)

    pids = _stack_pids(cfg)
    await asyncio.to_thread(devstack.down, cfg, ["kafka"])  # stops tansu and s3rver
    assert not [p for p in pids if _running(p)]

    second = await asyncio.to_thread(devstack.up, cfg, ["kafka"])
    assert second[0].running and second[0].pid != first[0].pid
    assert value in await _consume_all(cfg.kafka_bootstrap, topic, value)


def _http(cfg: StackConfig, method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {cfg.host}:{cfg.s3_port}\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((cfg.host, cfg.s3_port), timeout=10) as s:
        s.sendall(head.encode() + body)
        reply = b"".join(iter(lambda: s.recv(65536), b""))
    status, _, rest = reply.partition(b"\r\n")
    assert b" 200 " in status, status
    return rest.partition(b"\r\n\r\n")[2]


def test_an_upload_cut_short_leaves_the_previous_object(cfg: StackConfig) -> None:
    """A broker killed mid-PUT must not leave a partial object behind (real S3 never does);
    plain s3rver truncates the file first, which once emptied a Tansu watermark."""
    devstack.up(cfg, ["kafka"])
    path = f"/{S3_BUCKET}/cut-short.json"
    _http(cfg, "PUT", path, b'{"watermark": 41}')
    with socket.create_connection((cfg.host, cfg.s3_port), timeout=10) as s:
        s.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: {cfg.host}:{cfg.s3_port}\r\n"
            "Content-Length: 100000\r\n\r\n".encode()
            + b"x" * 70_000
        )
        time.sleep(0.5)  # the first 70 kB reached s3rver; then the client dies
    time.sleep(0.5)
    assert _http(cfg, "GET", path).endswith(b'{"watermark": 41}')


async def test_kill9_leaves_nothing_and_up_restarts(cfg: StackConfig) -> None:
    first = {s.name: s for s in await asyncio.to_thread(devstack.up, cfg, ["redis", "postgres"])}
    conn = await asyncpg.connect(cfg.postgres_dsn)  # so a backend process exists
    backend = await conn.fetchval("select pg_backend_pid()")
    pids = _stack_pids(cfg)
    assert backend in pids

    await asyncio.to_thread(devstack.kill9, cfg, "postgres")
    assert not _running(backend) and not _running(first["postgres"].pid or 0)
    conn.terminate()
    st = {s.name: s for s in devstack.status(cfg, ["redis", "postgres"])}
    assert st["redis"].running and not st["postgres"].running

    again = {s.name: s for s in await asyncio.to_thread(devstack.up, cfg, ["redis", "postgres"])}
    assert again["redis"].pid == first["redis"].pid
    assert again["postgres"].running and again["postgres"].pid != first["postgres"].pid
    conn = await asyncpg.connect(cfg.postgres_dsn)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


def test_stale_pidfile_is_replaced(cfg: StackConfig) -> None:
    # pid 1 is alive but is not our redis: it must be neither trusted nor signalled.
    cfg.pid_file("redis").parent.mkdir(parents=True, exist_ok=True)
    cfg.pid_file("redis").write_text("1\n")
    (st,) = devstack.up(cfg, ["redis"], timeout=20)
    assert st.running and st.pid not in (None, 1)
    assert int(cfg.pid_file("redis").read_text()) == st.pid
    devstack.kill9(cfg, "redis")  # leaves a dead pid in the pidfile, like a crash
    (after,) = devstack.status(cfg, ["redis"])
    assert not after.running and after.pid is None
    (again,) = devstack.up(cfg, ["redis"], timeout=20)
    assert again.running and again.pid != st.pid


def test_port_in_use_is_a_clear_error(cfg: StackConfig) -> None:
    with socket.socket() as squatter:
        squatter.bind((cfg.host, cfg.redis_port))
        squatter.listen()
        with pytest.raises(StackError, match=r"redis: port .* already in use"):
            devstack.up(cfg, ["redis"], timeout=10)
    assert not devstack.status(cfg, ["redis"])[0].running


def test_unknown_service_is_rejected(cfg: StackConfig) -> None:
    with pytest.raises(StackError, match="unknown service"):
        devstack.up(cfg, ["mysql"])
