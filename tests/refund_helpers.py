"""Running the refund desk in tests: the gateway stand-in and the four agents as processes."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentmesh import devstack
from refund_desk.gateway_client import request_json
from refund_desk.gateway_standin import Reply
from tests.conftest import ROOT, AgentProcess
from tests.helpers import mesh

MODULE = "refund_desk"


@dataclass
class Gateway:
    port: int
    ledger: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, tmp: Path, *args: str) -> Gateway:
        gw = cls(port=devstack.free_port(), ledger=tmp / "ledger.jsonl", log=tmp / "gateway.log")
        gw.ledger.touch()
        gw.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"{MODULE}.gateway_standin",
                "--port",
                str(gw.port),
                "--ledger",
                str(gw.ledger),
                *args,
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT / "examples"),
                "GATEWAY_ADMIN_TOKEN": gw.admin_token,
            },
            stdout=gw.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while not devstack.tcp_open("127.0.0.1", gw.port):
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.05)
        return gw

    async def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Reply:
        """A call to the stand-in's /admin/* or /ledger, with its admin token."""
        return await request_json(self.url, method, path, body=body, admin_token=self.admin_token)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def refund_ids(self) -> dict[str, str]:
        lines = self.ledger.read_text().splitlines()
        return {e["ticket_id"]: e["refund_id"] for e in map(json.loads, filter(None, lines))}

    def paid(self) -> Counter[str]:
        """Refunds in the gateway's own ledger, by ticket (a count above 1 is a double payment)."""
        lines = self.ledger.read_text().splitlines()
        return Counter(json.loads(line)["ticket_id"] for line in lines if line.strip())


@dataclass
class Desk:
    env: dict[str, str]
    gateway: Gateway
    procs: list[AgentProcess] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # the desk's env beyond base_env

    def publish(self, session: str, *args: str, **ticket: Any) -> Any:
        r = mesh(self.env, "publish", "refund:tickets", "-t", "ticket.submitted", "-s", session,
                 "-p", json.dumps(ticket), "--json", *args)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    async def sessions_now(self) -> dict[str, dict[str, Any]]:
        return await asyncio.to_thread(self.sessions)

    def sessions(self) -> dict[str, dict[str, Any]]:
        r = mesh(self.env, "sessions", "--json", "--limit", "1000")
        assert r.returncode == 0, r.stderr
        return {row["session_id"]: row for row in json.loads(r.stdout)}

    async def until(self, session: str, status: str, timeout: float = 40) -> dict[str, Any]:
        from tests.conftest import eventually

        async def reached() -> dict[str, Any] | None:
            row = (await asyncio.to_thread(self.sessions)).get(session)
            return row if row and row["status"] == status else None

        found: dict[str, Any] = await eventually(
            reached, timeout=timeout, interval=0.3, what=f"{session} {status}"
        )
        return found


def start_desk(
    base_env: dict[str, str],
    agents: Callable[..., AgentProcess],
    tmp: Path,
    gateway_args: tuple[str, ...] = (),
    **extra: str,
) -> Desk:
    gw = Gateway.start(tmp, *gateway_args)
    env = {
        **base_env,
        "MESH_AGENTS_MODULE": MODULE,
        "REFUND_GATEWAY_URL": f"http://127.0.0.1:{gw.port}",
        **extra,
    }
    desk = Desk(env=env, gateway=gw)
    desk.extra = {k: v for k, v in env.items() if k not in base_env or base_env[k] != v}
    for name in ("intake", "risk", "payments", "payments", "notifier"):
        desk.procs.append(agents(name, **desk.extra))
    return desk
