"""The containers' exact commands and environment, run as local processes against the local
stack: what docker-compose.yml would start (Docker does not run here).

Every process gets the image's ENV (deploy/Dockerfile), then its compose service's
`environment`, its entry point and command, with only what a container network changes
swapped: service host names become loopback ports of the local stack, 0.0.0.0 becomes
127.0.0.1, each process gets a port of its own (containers each have 9100), /app/examples is
the checkout's examples/, and the secret files' paths become temporary files. Two things the
local stack cannot take are said here: it has no passwords (so *_PASSWORD_FILE is left out),
and its broker (Tansu) has no idempotent producer (so that one setting is off). The audit
topic is the test's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from agentmesh import devstack
from agentmesh.outbox.sessions import sessions
from tests.conftest import eventually
from tests.deploy_files import ROOT, compose, mesh_services

MESH = str(ROOT / ".venv" / "bin" / "mesh")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def _image_env(target: str = "demo") -> dict[str, str]:
    """ENV of the runtime stage, then of `target` (line continuations joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    env: dict[str, str] = {}
    for stage in stages:
        name = stage.split("\n")[0].split(" AS ")[-1].strip()
        if name not in ("runtime", target):
            continue
        for line in re.findall(r"^ENV (.+)$", stage, flags=re.M):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                env[key] = value
    return env


def _healthcheck_argv() -> list[str]:
    m = re.search(r"^HEALTHCHECK .*?CMD (\[.+?\])\s*$", DOCKERFILE, flags=re.M | re.S)
    assert m, "no exec-form HEALTHCHECK"
    argv: list[str] = json.loads(m.group(1))
    return argv


def _interpolate(value: Any) -> str:
    """Compose's ${VAR:-default}, with no .env: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


class Site:
    """The local stand-ins for the containers' network names."""

    def __init__(self, stack: devstack.StackConfig, db: str, tmp: Path) -> None:
        self.stack, self.db, self.tmp = stack, db, tmp
        self.gateway_port = devstack.free_port()
        self.topic = f"audit-deploy-{time.monotonic_ns()}"
        self.swaps = {
            "redis:6379": f"127.0.0.1:{stack.redis_port}",
            "postgres:5432/mesh": f"127.0.0.1:{stack.pg_port}/{db}",
            "kafka:9092": stack.kafka_bootstrap,
            "gateway-standin:8099": f"127.0.0.1:{self.gateway_port}",
            "/app/examples": str(ROOT / "examples"),
            "/var/lib/gateway": str(tmp),
            "/run/secrets": str(tmp / "secrets"),
        }
        (tmp / "secrets").mkdir()
        (tmp / "secrets" / "gateway_admin_token").write_text("local-test-token")

    def swap(self, value: str) -> str:
        for old, new in self.swaps.items():
            value = value.replace(old, new)
        return "127.0.0.1" if value == "0.0.0.0" else value

    def env(self, service: dict[str, Any], *, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "GATEWAY_"))}
        if "build" in service:  # the mesh image's own ENV (the gateway stand-in's too)
            env.update(_image_env())
        env.update({k: _interpolate(v) for k, v in (service.get("environment") or {}).items()})
        env = {k: self.swap(v) for k, v in env.items()}
        for key in [k for k in env if k.endswith("_PASSWORD_FILE")]:
            del env[key]  # the local stack has no passwords
        env["MESH_KAFKA_IDEMPOTENT_PRODUCER"] = "false"  # the local broker lacks it
        env["MESH_HTTP_PORT"] = str(port)
        env["MESH_AUDIT_TOPIC"] = self.topic
        return env


class Container:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.env, self.log = name, env, log
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )

    def health(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """The image's HEALTHCHECK, exactly, in this container's environment."""
        argv = _healthcheck_argv()
        argv[0] = PYTHON if argv[0] == "python" else argv[0]
        return subprocess.run(
            [*argv, *extra], env=self.env, capture_output=True, text=True, timeout=30
        )

    def stop(self, timeout: float) -> int:
        """`docker stop`: SIGTERM, then the stop grace period."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def site(stack: devstack.StackConfig, tmp_path: Path) -> Iterator[Site]:
    db = f"deploy_{time.monotonic_ns()}"

    async def create() -> None:
        conn = await asyncpg.connect(stack.postgres_dsn)
        await conn.execute(f'CREATE DATABASE "{db}"')
        await conn.close()

    asyncio.run(create())
    yield Site(stack, db, tmp_path)


def _ready(c: Container) -> bool:
    try:
        url = f"http://127.0.0.1:{c.env['MESH_HTTP_PORT']}/readyz"
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body.decode()


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, duration
    return float(m.group(1))


async def test_the_compose_services_run_as_local_processes(
    site: Site, redis: Redis, tmp_path: Path
) -> None:
    doc = compose()
    services = mesh_services(doc)
    started: list[Container] = []
    try:
        # the one-shot migration, on an empty database; a second run changes nothing
        migrate = services["migrate"]
        for _ in range(2):
            r = subprocess.run(
                [MESH, *migrate["command"]],
                env=site.env(migrate, port=0),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, r.stdout + r.stderr

        gateway = doc["services"]["gateway-standin"]
        argv = [site.swap(a) for a in [*gateway["entrypoint"], *gateway["command"]]]
        argv[argv.index("8099")] = str(site.gateway_port)
        argv[0] = PYTHON if argv[0] == "python" else argv[0]
        started.append(
            Container("gateway", argv, site.env(gateway, port=0), tmp_path / "gateway.log")
        )

        runs = {n: s for n, s in services.items() if s["command"][0] in ("agent", "relay")}
        runs = {n: s for n, s in runs.items() if not s.get("profiles")}
        assert {"intake", "risk", "payments", "notifier", "relay"} <= set(runs)
        for name, svc in runs.items():
            env = site.env(svc, port=devstack.free_port())
            log = tmp_path / f"{name}.log"
            started.append(Container(name, [MESH, *svc["command"]], env, log))
        procs = {c.name: c for c in started}

        mesh_procs = [c for c in procs.values() if c.name != "gateway"]

        async def ready(which: list[Container]) -> bool:  # plain HTTP: cheap under load
            for c in procs.values():
                assert c.proc.poll() is None, f"{c.name} exited: {c.log.read_text()[-3000:]}"
            return all(await asyncio.gather(*(asyncio.to_thread(_ready, c) for c in which)))

        agents_only = [c for c in mesh_procs if c.name != "relay"]
        await eventually(lambda: ready(agents_only), timeout=90, interval=0.5, what="agents")
        # a ticket goes through the whole desk, paid by the gateway, recorded in Kafka
        operator_env = procs["intake"].env
        ticket = {"ticket_id": "T-DEP", "customer": "a@example.com", "order_id": "O-1",
                  "amount_cents": 2500, "text": "arrived broken"}  # fmt: skip
        r = subprocess.run(
            [MESH, "publish", "refund:tickets", "-t", "ticket.submitted", "-s", "dep-1",
             "-p", json.dumps(ticket)],
            env=operator_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr

        async def refunded() -> bool:
            conn = await asyncpg.connect(dsn)
            try:
                rows = await sessions(conn, session_id="dep-1")
            finally:
                await conn.close()
            return bool(rows) and (rows[0]["status"], rows[0]["outcome"]) == ("ended", "refunded")

        dsn = operator_env["MESH_POSTGRES_DSN"]
        await eventually(refunded, timeout=90, interval=0.5, what="ticket refunded")
        await eventually(lambda: ready(mesh_procs), timeout=90, interval=0.5, what="relay")
        # then the image's HEALTHCHECK command itself, and the readiness probe's path
        for c, health, readiness in zip(
            mesh_procs,
            await asyncio.gather(*(asyncio.to_thread(c.health) for c in mesh_procs)),
            await asyncio.gather(*(asyncio.to_thread(c.health, "--ready") for c in mesh_procs)),
            strict=True,
        ):
            assert health.returncode == 0, (c.name, health.stderr)
            assert readiness.returncode == 0, (c.name, readiness.stderr)

        # the session's end-to-end time, observed once by the agent that ended it
        port = procs["notifier"].env["MESH_HTTP_PORT"]
        body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        assert 'mesh_session_seconds_count{agent="notifier",outcome="refunded"} 1.0' in body
        assert 'mesh_build_info{component="agent"' in body

        ledger = Path(site.swap("/var/lib/gateway/ledger.jsonl"))
        assert "T-DEP" in await asyncio.to_thread(ledger.read_text)  # the volume path

        async def all_published() -> bool:
            conn = await asyncpg.connect(dsn)
            try:
                n = await conn.fetchval(
                    "SELECT count(*) FROM mesh_outbox WHERE session_id = 'dep-1' "
                    "AND published_at IS NULL"
                )
            finally:
                await conn.close()
            return n == 0

        await eventually(all_published, timeout=90, interval=0.5, what="session relayed")
        replay = await asyncio.to_thread(
            subprocess.run,
            [MESH, "replay", "dep-1", "--json"],
            env=operator_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "ticket.closed" in replay.stdout  # the session, read back from Kafka

        # `docker stop`: SIGTERM, the process ends within stop_grace_period; then the
        # health check fails, as Docker would see it
        grace = _seconds(services["payments"]["stop_grace_period"])
        payments = procs["payments"]
        assert payments.stop(timeout=grace) == 0, payments.log.read_text()[-3000:]
        dead = payments.health()
        assert dead.returncode == 1 and "healthz" in dead.stderr
    finally:
        for c in started:
            c.kill()
