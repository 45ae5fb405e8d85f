"""`mesh dlq list|show` against a real Redis: filters, --json, and one-line errors."""

from __future__ import annotations

import json

from redis.asyncio import Redis

from agentmesh.bus import Streams
from agentmesh.bus.deadletter import DeadLetter
from agentmesh.bus.entry import StreamEntry
from tests.helpers import job, mesh


async def _dead_letter(redis: Redis) -> list[str]:
    bus = Streams(redis, group="g-workers", consumer="c-1")
    good = job(1, session="s-dlq")
    letters = [
        DeadLetter.from_exception(
            StreamEntry(stream="t:jobs", id="1-0", fields={b"envelope": b"{not json"}),
            ValueError("Expecting property name"),
            reason="malformed_json",
            group="g-workers",
            agent="worker",
            with_traceback=False,
        ),
        DeadLetter.from_exception(
            StreamEntry(
                stream="t:other", id="2-0", fields={b"envelope": good.to_wire()}, deliveries=5
            ),
            RuntimeError("upstream said no"),
            reason="max_deliveries",
            group="g-finisher",
            agent="finisher",
        ),
    ]
    return await bus.dead_letter(letters)


async def test_dlq_list_filters_and_json(base_env: dict[str, str], redis: Redis) -> None:
    ids = await _dead_letter(redis)
    r = mesh(base_env, "dlq", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["id"] for row in rows] == ids
    assert [row["reason"] for row in rows] == ["malformed_json", "max_deliveries"]
    assert rows[1]["session_id"] == "s-dlq" and rows[1]["event_type"] == "job.created"
    assert rows[1]["deliveries"] == 5 and rows[0]["event_type"] == "?"

    def listed(*args: str) -> list[str]:
        r = mesh(base_env, "dlq", "list", "--json", *args)
        assert r.returncode == 0, r.stderr
        return [row["id"] for row in json.loads(r.stdout)]

    assert listed("--stream", "t:other") == ids[1:]
    assert listed("--agent", "worker") == ids[:1]
    assert listed("--match", "UPSTREAM") == ids[1:]  # matches the error text too
    assert listed("--older-than", "1h") == []
    assert listed("--newer-than", "1h") == ids

    table = mesh(base_env, "dlq", "list")
    assert table.returncode == 0 and "malformed_json" in table.stdout
    assert "2 dead-lettered message(s)" in table.stdout


async def test_dlq_show_prints_envelope_reason_and_history(
    base_env: dict[str, str], redis: Redis
) -> None:
    ids = await _dead_letter(redis)
    r = mesh(base_env, "dlq", "show", ids[1], "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["envelope"]["payload"]["n"] == 1
    assert shown["error"] == "upstream said no" and shown["deliveries"] == 5
    assert shown["first_failure"] and shown["last_failure"] and "RuntimeError" in shown["traceback"]
    raw = json.loads(mesh(base_env, "dlq", "show", ids[0], "--json").stdout)
    assert raw["envelope"] == "{not json"  # kept verbatim when it is not JSON
    human = mesh(base_env, "dlq", "show", ids[1])
    assert human.returncode == 0 and "max_deliveries" in human.stdout and "s-dlq" in human.stdout


def test_dlq_bad_input_is_one_line_and_exit_code(base_env: dict[str, str]) -> None:
    for args, code in (
        (["dlq", "show", "nope"], 2),
        (["dlq", "list", "--older-than", "soon"], 2),
        (["dlq", "show", "99-0"], 1),
    ):
        r = mesh(base_env, *args)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
