"""The refund desk's processes on the local stack: the gateway stand-in, five agent processes
(two payments replicas) and the relay, each detached (`devstack.background`) so that
`mesh demo --keep` can leave them running and `mesh dev down` can stop them."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentmesh import Settings, devstack
from refund_desk.gateway_client import request_json
from refund_desk.gateway_standin import Reply

MODULE = "refund_desk"
AGENTS = ("intake", "risk", "payments", "payments", "notifier")


def _agent_env(s: Settings, gateway_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "MESH_REDIS_URL": s.redis_url,
        "MESH_POSTGRES_DSN": s.postgres_dsn,
        "MESH_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "MESH_AUDIT_TOPIC": s.audit_topic,
        "MESH_AGENTS_MODULE": MODULE,
        "MESH_LOG_FORMAT": "json",
        "MESH_CLAIM_IDLE_MS": "2000",
        "REFUND_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
    }


@dataclass
class Desk:
    """The processes of one demo run, and where to reach them."""

    gateway_port: int
    ledger: Path
    admin_token_file: Path  # the stand-in's admin token (its /admin/* and /ledger need it)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # process name -> /metrics

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    async def gateway_admin(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Reply:
        """A call to the stand-in's /admin/* or /ledger, with its admin token."""
        token = self.admin_token_file.read_text().strip()
        return await request_json(self.gateway_url, method, path, body=body, admin_token=token)


def start_desk(s: Settings, cfg: devstack.StackConfig) -> Desk:
    """The gateway stand-in, five agent processes and the relay, each its own process."""
    devstack.background.stop(cfg)  # a desk an earlier `mesh demo --keep` left running
    ledger = cfg.root / "gateway-ledger.jsonl"
    ledger.write_text("")
    token_file = cfg.root / "gateway-admin-token"
    token_file.unlink(missing_ok=True)
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_urlsafe(24))
    desk = Desk(gateway_port=devstack.free_port(), ledger=ledger, admin_token_file=token_file)
    gateway = [sys.executable, "-m", f"{MODULE}.gateway_standin", "--port",
               str(desk.gateway_port), "--ledger", str(ledger), "--latency", "0.005"]  # fmt: skip
    gateway_env = {**os.environ, "GATEWAY_ADMIN_TOKEN_FILE": str(token_file)}
    devstack.background.start(cfg, "gateway-standin", gateway, gateway_env)
    env = _agent_env(s, desk.gateway_port)
    seen: Counter[str] = Counter()
    names = []
    for n in AGENTS:
        seen[n] += 1
        names.append(f"agent-{n}-{seen[n]}" if AGENTS.count(n) > 1 else f"agent-{n}")
    for name, agent in zip(names, AGENTS, strict=True):
        port = devstack.free_port()
        desk.metrics_ports[name] = port
        devstack.background.start(
            cfg,
            name,
            [sys.executable, "-m", "agentmesh", "agent", "run", agent, "--http-port", str(port)],
            env,
        )
    port = devstack.free_port()
    desk.metrics_ports["relay"] = port
    devstack.background.start(
        cfg, "relay", [sys.executable, "-m", "agentmesh", "relay", "run", "--http-port", str(port)],
        env,
    )  # fmt: skip
    return desk


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status), r.read().decode()
    except OSError as exc:
        code = getattr(exc, "code", 0)
        return int(code) if isinstance(code, int) else 0, ""


async def wait_ready(desk: Desk, cfg: devstack.StackConfig, within_s: float = 60) -> None:
    """Every process answers /readyz (agents: Redis and Postgres reachable, groups made)."""
    deadline = time.monotonic() + within_s
    waiting = dict(desk.metrics_ports)
    while waiting:
        for name, port in list(waiting.items()):
            code, _ = await asyncio.to_thread(http_get, port, "/readyz")
            if code == 200:
                del waiting[name]
        gw_up = devstack.tcp_open("127.0.0.1", desk.gateway_port)
        if not waiting and gw_up:
            return
        if time.monotonic() > deadline:
            late = ", ".join(sorted(waiting)) or "gateway-standin"
            raise devstack.StackError(f"not ready after {within_s:.0f} s: {late} (logs in "
                                      f"{cfg.logs_dir})")  # fmt: skip
        await asyncio.sleep(0.2)
