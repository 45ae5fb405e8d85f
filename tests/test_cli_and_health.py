"""The `mesh` command's contract (exit codes, one-line errors, --json) and /healthz /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import asyncpg
from redis.asyncio import Redis

from agentmesh import devstack
from tests.conftest import AgentProcess, eventually
from tests.helpers import actions, job, mesh, publish


def test_publish_rejects_bad_input_with_one_line_and_exit_2(base_env: dict[str, str]) -> None:
    cases = [
        ["publish", "t:jobs", "--type", "job.created", "--payload", "{nope"],
        ["publish", "t:jobs", "--type", "job.created", "--payload", '{"n": "x"}'],
        ["publish", "t:jobs", "--type", "no.such", "--payload", "{}"],
        ["publish", "t:other", "--type", "job.created", "--payload", '{"n": 1}'],
        ["publish", "t:jobs", "--type", "job.created", "--payload", "@/does/not/exist"],
        ["agent", "run", "nobody"],
    ]
    for args in cases:
        r = mesh(base_env, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("error:"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


OPERATOR_BAD_INPUT = [  # (args, exit code, what stderr must say)
    (["sessions", "--status", "bogus"], 2, "unknown status"),
    (["sessions", "--limit", "0"], 2, "--limit"),
    (["session", "nope", "--json"], 1, "no session 'nope'"),
    (["approve", "nope"], 1, "not waiting"),
    (["reject", "nope"], 2, "--reason"),
    (["reject", "nope", "--reason", " "], 2, "--reason must say why"),
    (["dlq", "list", "--older-than", "soon"], 2, "bad age"),
    (["dlq", "show", "0-1", "--json"], 1, "no DLQ entry"),
    (["dlq", "show", "not-an-id"], 2, "bad DLQ id"),
    (["dlq", "retry"], 2, "choose the entries"),
    (["dlq", "retry", "0-1", "--all"], 2, "exactly one"),
    (["dlq", "drop", "0-1"], 2, "--reason"),
    (["dlq", "drop", "0-1", "--reason", "x", "--json"], 1, "no DLQ entry"),
    (["dlq", "edit", "0-1", "--payload", "{}"], 1, "no DLQ entry"),
    (["demo", "--mesh", "nope"], 2, "unknown mesh"),
    (["demo", "--tickets", "1"], 2, "--tickets"),
    (["replay", "nope", "--until", "yesterday"], 2, "neither an event id"),
    (["outbox", "republish", "--reason", "x"], 2, "exactly one of --session or --since"),
    (["publish", "refund:tickets", "-t", "ticket.submitted", "-p", '{"ticket_id": ""}'], 2,
     "ticket_id"),
]  # fmt: skip


def test_operator_commands_refuse_bad_input_with_a_clear_error(base_env: dict[str, str]) -> None:
    env = {**base_env, "MESH_AGENTS_MODULE": "refund_desk"}
    for args, code, says in OPERATOR_BAD_INPUT:
        r = mesh(env, *args)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)  # nothing half-printed, --json or not


def test_a_process_without_an_agents_module_stops_with_one_line(
    base_env: dict[str, str],
) -> None:
    """No default MESH_AGENTS_MODULE: a production process that forgot it must not quietly
    run some example's agents."""
    env = {k: v for k, v in base_env.items() if k != "MESH_AGENTS_MODULE"}
    for args in (["agent", "run", "worker"], ["agent", "list"], ["status"]):
        r = mesh(env, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip().splitlines() == [
            "error: MESH_AGENTS_MODULE is not set: name the module that defines your agents "
            "(or pass --module)"
        ], r.stderr


def test_version(base_env: dict[str, str]) -> None:
    r = mesh(base_env, "--version")
    assert r.returncode == 0 and r.stdout.startswith("mesh "), r.stdout + r.stderr
    assert r.stdout.split()[1][0].isdigit()


def test_config_json_is_the_settings_in_force(base_env: dict[str, str]) -> None:
    r = mesh(base_env, "config", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["redis_url"] == base_env["MESH_REDIS_URL"]


async def test_publish_from_stdin_writes_a_valid_envelope(
    base_env: dict[str, str], redis: Redis
) -> None:
    r = mesh(
        base_env, "publish", "t:jobs", "-t", "job.created", "-p", "-", "--json", stdin='{"n": 3}'
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ((_, fields),) = await redis.xrange("t:jobs")
    env = json.loads(fields[b"envelope"])
    assert env["event_id"] == out["event_id"] and env["payload"] == {
        "n": 3,
        "sleep_ms": 0,
        "fail": None,
    }
    assert out["session_id"].startswith("s-")


def test_unreachable_server_exits_3(base_env: dict[str, str]) -> None:
    env = {**base_env, "MESH_REDIS_URL": f"redis://127.0.0.1:{devstack.free_port()}/0"}
    r = mesh(env, "publish", "t:jobs", "-t", "job.created", "-p", '{"n": 1}')
    assert r.returncode == 3 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_agent_list_json(base_env: dict[str, str]) -> None:
    r = mesh(base_env, "agent", "list", "--json")
    assert r.returncode == 0
    names = {a["name"] for a in json.loads(r.stdout)}
    assert {"worker", "finisher", "caller"} <= names


def test_db_migrate_is_idempotent(base_env: dict[str, str]) -> None:
    r = mesh(base_env, "db", "migrate", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_health_ready_and_metrics(
    redis: Redis, pg: asyncpg.Connection, agents: Callable[..., AgentProcess]
) -> None:
    port = devstack.free_port()
    agents("worker", MESH_HTTP_PORT=str(port))
    base = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            return _get(base + "/readyz")[0] == 200
        except OSError:
            return False

    await eventually(ready, what="/readyz")
    assert _get(base + "/healthz") == (200, "ok")
    await publish(redis, [job(1), job(2)])
    await eventually(lambda: _at(pg, 2), what="processed")

    async def counted() -> bool:
        return (
            'mesh_messages_processed_total{agent="worker",type="job.created"} 2.0'
            in _get(base + "/metrics")[1]
        )

    await eventually(counted, what="metrics")
    body = _get(base + "/metrics")[1]
    for name in (
        "mesh_handler_seconds_bucket",
        "mesh_batch_size_bucket",
        "mesh_group_pending",
        "mesh_group_lag",
    ):
        assert name in body
    assert _get(base + "/nope")[0] == 404


async def _at(pg: asyncpg.Connection, n: int) -> bool:
    return await actions(pg, "worker") >= n
