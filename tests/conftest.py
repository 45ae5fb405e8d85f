"""One local stack (Redis, PostgreSQL and the Kafka-compatible broker on file-backed S3, real
servers on loopback) for the whole test session.

Servers get free ports and a temporary data dir; they are stopped when the session ends.
Each test starts from empty streams and tables.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from agentmesh import devstack
from agentmesh.outbox.migrate import migrate

ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL = 12_000

# Processes started by the running test; their logs are attached to its report if it fails.
_started: list[MeshProcess] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed and rep.when in ("setup", "call"):
        for p in _started:
            rep.sections.append((f"log of {p.name} (pid {p.proc.pid})", p.log()[-LOG_TAIL:]))
        stack = getattr(item, "funcargs", {}).get("stack")
        if isinstance(stack, devstack.StackConfig):  # the test restarted a server: its side
            for name in ("kafka", "redis", "postgres"):
                log = stack.logs_dir / f"{name}.log"
                if log.is_file():
                    text = log.read_text(errors="replace")[-LOG_TAIL // 3 :]
                    rep.sections.append((f"server log {name}", text))


_ledger_audit: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _no_refund_paid_twice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Across the whole session, every ledger the payment gateway stand-in wrote (one per test
    that ran it, the demo's included) shows no ticket paid twice. A double payment fails the
    run here even if the test that caused it did not look."""
    yield
    from refund_desk.gateway_standin import paid_twice, read_ledger

    files = sorted(tmp_path_factory.getbasetemp().glob("**/*ledger.jsonl"))
    refunds = 0
    doubled: dict[str, dict[str, int]] = {}
    for f in files:
        entries = read_ledger(f)
        refunds += len(entries)
        if twice := paid_twice(entries):
            doubled[str(f)] = twice
    _ledger_audit.append(
        f"gateway stand-in ledgers: {len(files)} files, {refunds} refunds, "
        f"{sum(len(t) for t in doubled.values())} tickets paid twice"
    )
    assert not doubled, f"refunds paid twice: {doubled}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _ledger_audit:
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _forget_processes() -> Iterator[None]:
    _started.clear()
    yield
    _started.clear()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.StackConfig]:
    cfg = devstack.StackConfig(
        root=tmp_path_factory.mktemp("stack"),
        redis_port=devstack.free_port(),
        pg_port=devstack.free_port(),
        kafka_port=devstack.free_port(),
        s3_port=devstack.free_port(),
    )
    try:
        devstack.up(cfg, ("redis", "postgres", "kafka"))
        asyncio.run(migrate(cfg.postgres_dsn))
        yield cfg
    finally:
        devstack.down(cfg, ("redis", "postgres", "kafka"))


@pytest.fixture(scope="session")
def base_env(stack: devstack.StackConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_REDIS_URL=stack.redis_url,
        MESH_POSTGRES_DSN=stack.postgres_dsn,
        MESH_KAFKA_BOOTSTRAP=stack.kafka_bootstrap,
        MESH_AGENTS_MODULE="tests.mesh_fixture",
        MESH_HTTP_PORT="0",
        MESH_CLAIM_IDLE_MS="1500",
        MESH_RETRY_INITIAL_S="0.05",
        MESH_RETRY_MAX_S="0.2",
        MESH_GRACE_S="10",
        MESH_LOG_LEVEL="INFO",
        MESH_KAFKA_PARTITIONS="4",
        MESH_KAFKA_REQUEST_TIMEOUT_MS="5000",
        MESH_RELAY_POLL_INTERVAL_S="0.2",
        MESH_RELAY_RETRY_MAX_S="1",
        MESH_RELAY_REBALANCE_INTERVAL_S="1",
        PYTHONPATH=os.pathsep.join((str(ROOT), str(ROOT / "examples"))),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
async def redis(stack: devstack.StackConfig) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def pg(stack: devstack.StackConfig) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.postgres_dsn)
    await conn.execute(
        "TRUNCATE mesh_idempotency, mesh_actions, mesh_outbox, mesh_audit_index, "
        "mesh_relay_config RESTART IDENTITY"
    )
    yield conn
    await conn.close()


@pytest.fixture
def audit_env(base_env: dict[str, str]) -> dict[str, str]:
    """base_env with an audit topic of the test's own, so tests never see each other's log."""
    return {**base_env, "MESH_AUDIT_TOPIC": f"audit-{time.monotonic_ns()}"}


class MeshProcess:
    """A real `mesh …` process (an agent, a relay), as an operator would start it."""

    def __init__(
        self, argv: list[str], name: str, env: dict[str, str], log_dir: Path, **extra: str
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        full_env = {**env, **extra}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentmesh", *argv],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        _started.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class AgentProcess(MeshProcess):
    def __init__(self, name: str, env: dict[str, str], log_dir: Path, **extra: str) -> None:
        super().__init__(["agent", "run", name], name, env, log_dir, **extra)


@pytest.fixture
def agents(base_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(name: str, **extra: str) -> AgentProcess:
        p = AgentProcess(name, base_env, tmp_path, **extra)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


async def eventually(
    check: Callable[[], Any], *, timeout: float = 30, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll an async predicate until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")


@pytest.fixture
def relays(audit_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., MeshProcess]]:
    """Start `mesh relay run` processes on the test's audit topic."""
    started: list[MeshProcess] = []

    def start(**extra: str) -> MeshProcess:
        p = MeshProcess(["relay", "run"], "relay", audit_env, tmp_path, **extra)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()
