"""The README's main job, as a newcomer runs it: `mesh demo` on a fresh data dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agentmesh import devstack
from tests.conftest import ROOT


def _our_processes(root: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(root) in line]


def test_mesh_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    ports = devstack.free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_DEV_ROOT=str(tmp_path / ".mesh"),
        MESH_REDIS_URL=f"redis://127.0.0.1:{ports[0]}/0",
        MESH_POSTGRES_DSN=f"postgresql://mesh@127.0.0.1:{ports[1]}/mesh",
        MESH_KAFKA_BOOTSTRAP=f"127.0.0.1:{ports[2]}",
        MESH_DEV_S3_PORT=str(ports[3]),
        PYTHONPATH=str(ROOT),
    )
    r = subprocess.run(
        [sys.executable, "-m", "agentmesh", "demo", "--mesh", "planner", "--tasks", "4"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 4 sessions went planner → writer" in r.stdout
    assert r.stdout.count("task.submitted → plan.ready") == 4
    assert r.stdout.count("plan.ready → draft.ready") == 4
    # one session replayed from Kafka: the task, two actions and two handoffs
    assert "replayed from the Kafka audit log" in r.stdout
    assert ": 5 events from Kafka" in r.stdout
    assert "handled task.submitted → emitted plan.ready" in r.stdout
    assert "handled plan.ready → emitted draft.ready" in r.stdout
    assert _our_processes(tmp_path) == []
    status = subprocess.run(
        [sys.executable, "-m", "agentmesh", "dev", "status", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1, "everything is stopped"


def test_refund_desk_demo_settles_every_ticket_pays_none_twice_and_stops(tmp_path: Path) -> None:
    ports = devstack.free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_DEV_ROOT=str(tmp_path / ".mesh"),
        MESH_REDIS_URL=f"redis://127.0.0.1:{ports[0]}/0",
        MESH_POSTGRES_DSN=f"postgresql://mesh@127.0.0.1:{ports[1]}/mesh",
        MESH_KAFKA_BOOTSTRAP=f"127.0.0.1:{ports[2]}",
        MESH_DEV_S3_PORT=str(ports[3]),
        PYTHONPATH=str(ROOT),
    )
    r = subprocess.run(
        [sys.executable, "-m", "agentmesh", "demo", "--tickets", "80"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "what happened to the tickets" in out and "the DLQ (mesh dlq list)" in out
    assert "schema_violation" in out  # the malformed tickets, with their reason
    assert "refunds paid twice           │ 0" in out
    assert "replayed from the Kafka audit log" in out and "ticket.closed" in out
    ledger = (tmp_path / ".mesh" / "gateway-ledger.jsonl").read_text().splitlines()
    tickets = [line.split('"ticket_id": "')[1].split('"')[0] for line in ledger if line]
    assert tickets and len(tickets) == len(set(tickets))  # the gateway's own ledger
    assert _our_processes(tmp_path) == []
