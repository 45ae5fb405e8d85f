"""Restarts without a person: agents and relays that start while their servers are down wait
for them (ready only once they answer, no tracebacks), a misconfiguration still fails at once,
and the local stack restarts PostgreSQL over the lock file a kill -9 left behind.

Every test that stops a server brings it back before it ends (`_restored`): the servers are
the session's, shared with the tests that run after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.exceptions as redis_errors
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from agentmesh import devstack
from agentmesh.devstack import postgres
from agentmesh.process.logs import OneLineErrors
from agentmesh.process.waiting import Misconfigured, Outages, Server, outage_reason
from agentmesh.schemas import Envelope
from tests.audit_helpers import backlog, event, insert, read_topic, settings_from
from tests.conftest import AgentProcess, MeshProcess, eventually
from tests.helpers import actions, job, mesh, publish, stream_events

Start = Callable[..., AgentProcess]
StartRelay = Callable[..., MeshProcess]


@contextlib.contextmanager
def _restored(stack: devstack.StackConfig, service: str) -> Iterator[None]:
    """Whatever happens inside, `service` runs again afterwards, for the tests after this one.
    (If the code under test cannot restart PostgreSQL over a stale lock file, this removes
    the file by hand: the failure is this test's, not the next one's.)"""
    try:
        yield
    finally:
        try:
            devstack.up(stack, (service,))
        except devstack.StackError:
            if service != "postgres":
                raise
            for lock in _lock_files(stack):
                lock.unlink(missing_ok=True)
            devstack.up(stack, (service,))


def _lock_files(stack: devstack.StackConfig) -> list[Path]:
    """What a postmaster locks, its pid on the first line: the data dir, and its socket."""
    return [
        stack.data_dir("postgres") / "postmaster.pid",
        stack.run_dir / "pgsock" / f".s.PGSQL.{stack.pg_port}.lock",
    ]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _probe(port: int, path: str = "/readyz") -> tuple[int, str] | None:
    """(status, body), or None while nothing listens on the port yet."""
    try:
        return await asyncio.to_thread(_get, port, path)
    except OSError:
        return None


async def _not_ready_waiting_for(port: int, server: str) -> str:
    """Poll until /readyz answers 503 naming `server`; its body."""

    async def check() -> str | None:
        got = await _probe(port)
        if got is not None and got[0] == 503 and f"waiting for {server}" in got[1]:
            return got[1]
        return None

    body: str = await eventually(check, timeout=30, what=f"/readyz: waiting for {server}")
    return body


async def _ready(port: int) -> bool:
    got = await _probe(port)
    return got is not None and got[0] == 200


def _assert_waited_quietly(p: MeshProcess, server: str, outage_s: float) -> None:
    """Alive, no traceback, and one line about the wait (repeated at most every 10 s), not one
    per retry."""
    log = p.log()
    assert "Traceback" not in log, log
    lines = [ln for ln in log.splitlines() if f"waiting for {server}" in ln]
    assert 1 <= len(lines) <= 1 + outage_s // 10, lines


async def test_agent_started_while_postgres_is_down_waits_then_handles_jobs_once(
    redis: Redis, pg: asyncpg.Connection, agents: Start, stack: devstack.StackConfig
) -> None:
    await pg.close()
    port = devstack.free_port()
    with _restored(stack, "postgres"):
        devstack.kill9(stack, "postgres")
        down_at = time.monotonic()
        p = agents("worker", MESH_HTTP_PORT=str(port))
        body = await _not_ready_waiting_for(port, "PostgreSQL")
        assert f"127.0.0.1:{stack.pg_port}" in body and "connection refused" in body, body
        assert await _probe(port, "/healthz") == (200, "ok")  # live all along
        sent = [job(i, session=f"s-{i % 3}") for i in range(20)]
        await publish(redis, sent)  # Redis is up: the jobs wait in the stream
        await asyncio.sleep(2)  # several attempts, backing off
        assert p.alive(), p.log()
        await asyncio.to_thread(devstack.up, stack, ("postgres",))
        outage_s = time.monotonic() - down_at
    await eventually(lambda: _ready(port), timeout=30, what="/readyz 200 once PostgreSQL is back")
    fresh = await asyncpg.connect(stack.postgres_dsn)
    try:
        await eventually(lambda: _handled(fresh, 20), timeout=60, what="the 20 jobs handled")
        rows = await fresh.fetch(
            "SELECT input_event_id::text AS id, count(*) AS n FROM mesh_actions "
            "WHERE agent = 'worker' GROUP BY 1"
        )
        assert {r["id"] for r in rows} == {e.event_id for e in sent}
        assert all(r["n"] == 1 for r in rows)
        assert len(await stream_events(redis, "t:done")) == 20
    finally:
        await fresh.close()
    assert p.alive()
    _assert_waited_quietly(p, "PostgreSQL", outage_s)
    assert p.terminate() == 0


async def _handled(pg: asyncpg.Connection, n: int) -> bool:
    return await actions(pg, "worker") >= n


async def test_agent_started_while_redis_is_down_waits_then_handles_jobs_once(
    redis: Redis, pg: asyncpg.Connection, agents: Start, stack: devstack.StackConfig
) -> None:
    port = devstack.free_port()
    with _restored(stack, "redis"):
        devstack.kill9(stack, "redis")
        down_at = time.monotonic()
        p = agents("worker", MESH_HTTP_PORT=str(port))
        body = await _not_ready_waiting_for(port, "Redis")
        assert f"127.0.0.1:{stack.redis_port}" in body, body
        await asyncio.sleep(2)
        assert p.alive(), p.log()
        await asyncio.to_thread(devstack.up, stack, ("redis",))
        outage_s = time.monotonic() - down_at
    await eventually(lambda: _ready(port), timeout=30, what="/readyz 200 once Redis is back")
    sent = [job(i) for i in range(20)]
    await eventually(lambda: _publish_ok(redis, sent), what="publish (a new connection)")
    await eventually(lambda: _handled(pg, 20), timeout=60, what="the 20 jobs handled")
    await asyncio.sleep(0.5)
    assert await actions(pg, "worker") == 20
    runs = [int(x or 0) for x in await redis.mget([f"t:runs:{e.event_id}" for e in sent])]
    assert runs == [1] * 20
    _assert_waited_quietly(p, "Redis", outage_s)
    assert p.terminate() == 0


async def _publish_ok(redis: Redis, envelopes: list[Envelope]) -> bool:
    """The test's own client lost its connection with the server it had: the first command
    on it fails, the next one connects again."""
    try:
        await publish(redis, envelopes)
        return True
    except RedisConnectionError:
        return False


async def test_sigterm_while_waiting_for_a_server_exits_at_once(
    agents: Start, base_env: dict[str, str]
) -> None:
    port = devstack.free_port()
    nowhere = f"postgresql://mesh@127.0.0.1:{devstack.free_port()}/mesh"
    p = agents("worker", MESH_HTTP_PORT=str(port), MESH_POSTGRES_DSN=nowhere)
    await _not_ready_waiting_for(port, "PostgreSQL")
    started = time.monotonic()
    assert p.terminate(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in p.log()


async def test_relay_started_while_postgres_is_down_publishes_once_it_is_back(
    stack: devstack.StackConfig, audit_env: dict[str, str], relays: StartRelay
) -> None:
    s = settings_from(audit_env)
    conn = await asyncpg.connect(stack.postgres_dsn)
    await conn.execute("TRUNCATE mesh_outbox, mesh_audit_index, mesh_relay_config RESTART IDENTITY")
    await insert(conn, [event(f"r-{i % 4}", i // 4) for i in range(40)])
    await conn.close()
    port = devstack.free_port()
    with _restored(stack, "postgres"):
        devstack.kill9(stack, "postgres")
        down_at = time.monotonic()
        relay = relays(MESH_HTTP_PORT=str(port))
        await _not_ready_waiting_for(port, "PostgreSQL")
        await asyncio.sleep(2)
        assert relay.alive(), relay.log()
        await asyncio.to_thread(devstack.up, stack, ("postgres",))
        outage_s = time.monotonic() - down_at
    pg = await asyncpg.connect(stack.postgres_dsn)
    try:
        await insert(pg, [event(f"r-{i % 4}", 10 + i // 4) for i in range(40)])
        await eventually(lambda: _empty(pg), timeout=60, what="outbox published")
    finally:
        await pg.close()
    await eventually(lambda: _ready(port), timeout=30, what="relay /readyz 200")
    records = await read_topic(s)
    assert len({dict(r.headers)["event_id"] for r in records}) == 80
    _assert_waited_quietly(relay, "PostgreSQL", outage_s)
    assert relay.terminate() == 0


async def _empty(pg: asyncpg.Connection) -> bool:
    return await backlog(pg) == 0


async def test_relay_started_while_kafka_is_down_publishes_once_it_is_back(
    pg: asyncpg.Connection,
    stack: devstack.StackConfig,
    audit_env: dict[str, str],
    relays: StartRelay,
) -> None:
    s = settings_from(audit_env)
    await insert(pg, [event(f"k-{i % 4}", i // 4) for i in range(40)])
    port = devstack.free_port()
    with _restored(stack, "kafka"):
        devstack.kill9(stack, "kafka")
        down_at = time.monotonic()
        relay = relays(MESH_HTTP_PORT=str(port))
        await _not_ready_waiting_for(port, "Kafka")
        await asyncio.sleep(2)
        assert relay.alive(), relay.log()
        await asyncio.to_thread(devstack.up, stack, ("kafka",))
        outage_s = time.monotonic() - down_at
    await eventually(lambda: _empty(pg), timeout=60, what="outbox published")
    await eventually(lambda: _ready(port), timeout=30, what="relay /readyz 200")
    assert len({dict(r.headers)["event_id"] for r in await read_topic(s)}) == 40
    log = relay.log()
    assert "Traceback" not in log and "postgres unavailable" not in log, log
    kafka_lines = [ln for ln in log.splitlines() if "kafka unavailable" in ln]
    assert 1 <= len(kafka_lines) <= 1 + outage_s // 10, kafka_lines
    assert relay.terminate() == 0


def _misconfigured(stack: devstack.StackConfig) -> list[tuple[list[str], dict[str, str], str]]:
    """(command, settings, what its one error line must say): configurations that never work."""
    at = f"127.0.0.1:{stack.pg_port}"
    agent, relay = ["agent", "run", "worker"], ["relay", "run"]
    return [
        (agent, {"MESH_POSTGRES_DSN": f"postgresql://mesh@{at}/no_such_db"}, "does not exist"),
        (agent, {"MESH_POSTGRES_DSN": f"postgresql://nobody@{at}/mesh"}, '"nobody" does not'),
        (agent, {"MESH_POSTGRES_DSN": "mysql://mesh@127.0.0.1/mesh"}, "invalid DSN"),
        (agent, {"MESH_REDIS_URL": "http://127.0.0.1:1/0"}, "invalid setting redis_url"),
        (relay, {"MESH_POSTGRES_DSN": f"postgresql://mesh@{at}/no_such_db"}, "does not exist"),
        (relay, {"MESH_KAFKA_BOOTSTRAP": "127.0.0.1:nine"}, "invalid setting kafka_bootstrap"),
    ]


def test_a_misconfigured_server_fails_at_once_with_one_line(
    base_env: dict[str, str], stack: devstack.StackConfig
) -> None:
    for argv, settings, says in _misconfigured(stack):
        env = {**base_env, "MESH_HTTP_PORT": "0", **settings}
        started = time.monotonic()
        r = mesh(env, *argv, timeout=60)
        took = time.monotonic() - started
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2, (argv, settings, r.returncode, r.stderr)
        assert took < 20, (argv, settings, took)
        assert len(errors) == 1 and says in errors[0], (argv, settings, r.stderr)
        assert "Traceback" not in r.stderr and "waiting for" not in r.stderr, r.stderr


def _zombie_or_live(kind: str) -> subprocess.Popen[bytes]:
    """A process of PostgreSQL's user holding some pid: a zombie (the killed postmaster, not
    reaped yet) or a live process that got a dead postmaster's pid."""
    account = postgres.system_account()
    cmd = ["true"] if kind == "zombie" else ["sleep", "120"]
    proc = subprocess.Popen(
        cmd,
        user=account[0] if account else None,
        group=account[1] if account else None,
        extra_groups=[] if account else None,
    )
    if kind == "zombie":  # not reaped: the test holds the Popen and never waits on it
        deadline = time.monotonic() + 10
        while _state(proc.pid) != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.02)
    return proc


def _state(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rfind(")") + 2 :].split()[0]


@pytest.mark.parametrize("holder", ["zombie", "live"])
def test_postgres_restarts_over_the_lock_file_kill9_left(
    stack: devstack.StackConfig, holder: str
) -> None:
    lock = stack.data_dir("postgres") / "postmaster.pid"
    with _restored(stack, "postgres"):
        devstack.kill9(stack, "postgres")
        assert lock.is_file(), "kill -9 leaves postmaster.pid behind"
        squatter = _zombie_or_live(holder)
        try:
            # the pid in the lock files is now a process of PostgreSQL's user that is not a
            # postmaster: PostgreSQL itself would refuse to start ("lock file already exists")
            for f in _lock_files(stack):
                if f.is_file():
                    rest = f.read_text().split("\n", 1)[1]
                    f.write_text(f"{squatter.pid}\n{rest}")
            assert lock.read_text().split("\n", 1)[0] == str(squatter.pid)
            (st,) = devstack.up(stack, ("postgres",), timeout=60)
            assert st.running and st.pid is not None and st.pid != squatter.pid
            assert lock.read_text().split("\n", 1)[0] == str(st.pid)
            assert postgres.psql(stack, "select 1").strip() == "1"
        finally:
            squatter.kill()
            squatter.wait()


def test_a_live_postmasters_lock_file_is_never_taken(stack: devstack.StackConfig) -> None:
    """`up` on a running cluster, even one whose devstack pidfile was lost, leaves the
    postmaster and its lock file alone (it adopts it instead of starting a second one)."""
    (before,) = devstack.status(stack, ("postgres",))
    assert before.running and before.pid is not None
    locks = {f: f.read_text() for f in _lock_files(stack)}
    assert len(locks) == 2
    stack.pid_file("postgres").unlink()
    try:
        (after,) = devstack.up(stack, ("postgres",))
        assert after.running and after.pid == before.pid
        assert {f: f.read_text() for f in locks} == locks
        assert stack.pid_file("postgres").read_text().strip() == str(before.pid)
    finally:  # the session's postgres stays this one, and stays ours to stop
        stack.pid_file("postgres").write_text(f"{before.pid}\n")


# -- the rules, without servers ---------------------------------------------------------------
PG, REDIS, KAFKA = (
    Server.postgres("postgresql://mesh:secret@db:5440/mesh"),
    Server.redis("redis://:secret@cache/0"),
    Server.kafka("k1:9092,k2:9092"),
)


def test_addresses_never_carry_credentials() -> None:
    assert (PG.address, REDIS.address) == ("db:5440", "cache:6379")
    assert KAFKA.address == "k1:9092,k2:9092"
    said = PG.waiting("connection refused")
    assert said == "waiting for PostgreSQL at db:5440: connection refused"


def _refused() -> OSError:
    try:
        raise ConnectionRefusedError(111, "Connect call failed")
    except OSError as exc:
        return exc


@pytest.mark.parametrize(
    ("server", "exc", "reason"),
    [
        (PG, _refused(), "connection refused"),
        (PG, socket.gaierror(-2, "Name or service not known"), "host name does not resolve"),
        (PG, TimeoutError(), "no answer (timed out)"),
        (PG, asyncpg.CannotConnectNowError("the database system is starting up"),
         "the database system is starting up"),
        (PG, asyncpg.TooManyConnectionsError("too many clients"), "too many clients"),
        (PG, asyncpg.ConnectionDoesNotExistError("connection was closed"), "connection was closed"),
        (REDIS, redis_errors.ConnectionError("Error 111 connecting"), "Error 111 connecting"),
        (REDIS, redis_errors.BusyLoadingError("Redis is loading"), "Redis is loading"),
        (REDIS, redis_errors.ReadOnlyError("read only replica"), "read only replica"),
        (KAFKA, KafkaConnectionError("Unable to bootstrap from [...]"), "no broker answered"),
    ],
)  # fmt: skip
def test_a_server_that_is_down_is_waited_for(server: Server, exc: Exception, reason: str) -> None:
    assert outage_reason(server, exc) == reason


@pytest.mark.parametrize(
    ("server", "exc"),
    [
        (PG, asyncpg.InvalidCatalogNameError('database "x" does not exist')),
        (PG, asyncpg.InvalidPasswordError("password authentication failed")),
        (PG, asyncpg.InvalidAuthorizationSpecificationError('role "x" does not exist')),
        (PG, asyncpg.exceptions.ClientConfigurationError("invalid DSN")),
        (PG, ValueError("invalid literal for int()")),
        (PG, asyncpg.UndefinedTableError('relation "mesh_outbox" does not exist')),
        (REDIS, redis_errors.AuthenticationError("invalid password")),
        (REDIS, redis_errors.NoPermissionError("no permissions")),
        (REDIS, ValueError("Redis URL must specify one of the following schemes")),
        (KAFKA, TopicAuthorizationFailedError()),
    ],
)
def test_a_misconfiguration_fails_at_once(server: Server, exc: Exception) -> None:
    with pytest.raises(Misconfigured) as info:
        outage_reason(server, exc)
    assert info.value.errors()[0]["loc"] == (server.setting,)
    assert "secret" not in str(info.value)


def test_a_bug_is_not_judged() -> None:
    assert outage_reason(PG, KeyError("x")) is None
    assert outage_reason(REDIS, KeyError("x")) is None


def test_an_outage_is_logged_once_then_every_ten_seconds() -> None:
    now = [0.0]
    outages = Outages(clock=lambda: now[0])
    assert outages.down(PG, "connection refused") is not None  # the first attempt
    for _ in range(20):
        now[0] += 0.4
        assert outages.down(PG, "the database system is starting up") is None
    now[0] = 10.0
    again = outages.down(PG, "connection refused")
    assert again is not None and again.attempts == 22
    assert outages.describe() == "waiting for PostgreSQL at db:5440: connection refused"
    assert outages.up(PG) is again and outages.describe() is None


def test_an_outage_traceback_becomes_one_line_a_bug_keeps_its_own() -> None:
    f = OneLineErrors()

    def record(name: str, exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            name, logging.WARNING, __file__, 1, "Failed to restore %s", ("the floor",),
            (type(exc), exc, exc.__traceback__),
        )  # fmt: skip

    pool = record("asyncpg.pool", _refused())
    assert f.filter(pool) and pool.exc_info is None
    assert pool.getMessage() == (
        "Failed to restore the floor (ConnectionRefusedError: [Errno 111] Connect call failed)"
    )
    lost = record("asyncio", redis_errors.ConnectionError("Connection closed by server."))
    assert f.filter(lost) and lost.exc_info is None
    bug = record("asyncio", KeyError("x"))
    assert f.filter(bug) and bug.exc_info is not None
