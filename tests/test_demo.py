"""The README's main job, as a newcomer runs it: `mesh demo` on a fresh data dir."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from agentmesh import devstack
from refund_desk.gateway_standin import paid_twice, read_ledger


def _our_processes(root: Path) -> list[str]:
    """Live processes that name root in their command line or environment (the agents and the
    relay inherit MESH_DEV_ROOT), zombies excluded."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().split(") ", 1)[1].startswith("Z"):
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd or str(root) in env:
            found.append(f"{proc.name} {cmd}")
    return found


def _env(tmp_path: Path) -> dict[str, str]:
    ports = devstack.free_ports(4)
    # as from a fresh clone: no PYTHONPATH, the installed `mesh` finds the examples itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_") and k != "PYTHONPATH"}
    env.update(
        MESH_DEV_ROOT=str(tmp_path / ".mesh"),
        MESH_REDIS_URL=f"redis://127.0.0.1:{ports[0]}/0",
        MESH_POSTGRES_DSN=f"postgresql://mesh@127.0.0.1:{ports[1]}/mesh",
        MESH_KAFKA_BOOTSTRAP=f"127.0.0.1:{ports[2]}",
        MESH_DEV_S3_PORT=str(ports[3]),
    )
    return env


def _mesh(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentmesh", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_mesh_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = _mesh(env, tmp_path, "demo", "--mesh", "planner", "--tasks", "4")
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
    status = _mesh(env, tmp_path, "dev", "status", "--json")
    assert status.returncode == 1, "everything is stopped"


def test_refund_desk_demo_settles_every_ticket_pays_none_twice_and_stops(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = _mesh(env, tmp_path, "demo", "--tickets", "80", "--publish-seconds", "3",
              "--outage-seconds", "2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "what happened to the tickets" in out and "the DLQ (mesh dlq list)" in out
    assert "schema_violation" in out  # the malformed tickets, with their reason
    assert "refunds paid twice            │ 0" in out, out
    opened = re.search(r"payments breaker opened\s+│ (\d+) time", out)
    assert opened and int(opened.group(1)) >= 1, out  # the outage opened it, and it recovered
    assert re.search(r"events in the Kafka audit log\s+│ \d+ \(0 not yet relayed\)", out), out
    assert "replayed from the Kafka audit log" in out and "ticket.closed" in out
    refunded = re.search(r"│ refunded\s+│ (\d+)\s+│\n", out)  # the outcomes, from Postgres
    by_day = re.findall(r"│ [\d-]+ │ refunded\s+│ (\d+)\s+│", out)  # the read model, from Kafka
    assert refunded and sum(map(int, by_day)) == int(refunded.group(1)), out
    assert "open holds:" in out
    ledger = read_ledger(tmp_path / ".mesh" / "gateway-ledger.jsonl")
    assert ledger and paid_twice(ledger) == {}  # the gateway's own ledger
    assert _our_processes(tmp_path) == []


def test_demo_keep_then_the_readme_operator_path_then_dev_down(tmp_path: Path) -> None:
    """What the README tells a newcomer to do after `mesh demo --keep`: the commands the demo
    prints, with its real ids, run as printed; then `mesh dev down` leaves nothing."""
    env = {**_env(tmp_path), "MESH_OPERATOR": "newcomer"}
    r = _mesh(env, tmp_path, "demo", "--keep", "--tickets", "60", "--publish-seconds", "2",
              "--outage-seconds", "1")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        _operator_path(env, tmp_path, r.stdout)
        status = _mesh(env, tmp_path, "dev", "status")
        assert "agent-payments-2" in status.stdout and "gateway-standin" in status.stdout
    finally:
        down = _mesh(env, tmp_path, "dev", "down")
    assert down.returncode == 0 and "stopped 7 mesh process(es)" in down.stdout, down.stdout
    assert _our_processes(tmp_path) == []


def _operator_path(env: dict[str, str], tmp_path: Path, demo_out: str) -> None:
    steps = [line.strip() for line in demo_out.split("the desk is still running")[1].splitlines()
             if line.strip().startswith(("mesh ", "export "))]  # fmt: skip
    env.update(line.split(" ", 1)[1].split("=", 1) for line in steps if line.startswith("export"))
    approve = next(line for line in steps if line.startswith("mesh approve"))
    edit = next(line for line in steps if line.startswith("mesh dlq edit"))
    waiting = approve.split()[2]
    ok = _mesh(env, tmp_path, *shlex.split(approve)[1:])
    assert ok.returncode == 0 and "approved session" in ok.stdout, ok.stdout + ok.stderr
    shown = _mesh(env, tmp_path, "dlq", "show", edit.split()[3], "--json")
    assert shown.returncode == 0, shown.stderr
    dead_session = json.loads(shown.stdout)["session_id"]
    fixed = _mesh(env, tmp_path, *shlex.split(edit)[1:])
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    new_id = re.search(r"mesh dlq retry (\S+)", fixed.stdout)
    assert new_id, fixed.stdout
    retried = _mesh(env, tmp_path, "dlq", "retry", new_id.group(1), "--reason", "fixed", "--json")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    deadline = time.monotonic() + 60
    while True:  # the running desk pays both: the approved ticket and the repaired one
        rows = json.loads(_mesh(env, tmp_path, "sessions", "--json", "--limit", "500").stdout)
        by_id = {row["session_id"]: row for row in rows}
        if all(by_id.get(sid, {}).get("outcome") == "refunded" for sid in (waiting, dead_session)):
            break
        assert time.monotonic() < deadline, (by_id.get(waiting), by_id.get(dead_session))
        time.sleep(0.5)
    for session, who in ((waiting, "approval.decided"), (dead_session, "dlq.retry")):
        replay = _mesh(env, tmp_path, "replay", session)
        assert replay.returncode == 0 and who in replay.stdout, replay.stdout
        assert "operator:newcomer" in replay.stdout
    assert paid_twice(read_ledger(tmp_path / ".mesh" / "gateway-ledger.jsonl")) == {}
