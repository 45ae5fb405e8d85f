"""Pure logic of the audit log: partitioning, --until parsing, summaries, state folding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.partitioner import DefaultPartitioner

import tests.mesh_fixture  # noqa: F401  (registers the test event types and projections)
from agentmesh.agents.agent import AGENTS
from agentmesh.cli.timeline import summary
from agentmesh.outbox.kafka import partition_of, session_hash
from agentmesh.outbox.replay import ReplayedEvent, Until, fold_state
from agentmesh.schemas import registry


@pytest.mark.parametrize("session", ["s-1", "demo-ab12-3", "ünïcode-session", "x" * 64])
def test_partition_of_matches_kafkas_default_partitioner(session: str) -> None:
    parts = list(range(12))
    expected = DefaultPartitioner()(session.encode(), parts, parts)
    assert partition_of(session, parts) == expected == session_hash(session) % 12
    assert 0 <= session_hash(session) < 2**31


def test_until_parses_event_ids_and_zoned_times_and_refuses_the_rest() -> None:
    eid = "01a2013f-dbca-717e-94d4-3f771dfcf1df"
    assert Until.parse(eid) == Until(event_id=eid)
    assert Until.parse("2026-11-22T10:00:00+00:00").time == datetime(2026, 11, 22, 10, tzinfo=UTC)
    assert Until.parse("2026-11-22T10:00:00Z").time == datetime(2026, 11, 22, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither an event id nor an ISO time"):
        Until.parse("yesterday")
    with pytest.raises(ValueError, match="needs a time zone"):
        Until.parse("2026-11-22T10:00:00")


def _events(n: int) -> list[ReplayedEvent]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        env = registry.make(
            "job.created", {"n": i}, session_id="s", created_at=t0 + timedelta(seconds=i)
        )
        out.append(ReplayedEvent(env, 0, i))
    return out


def test_until_cuts_at_an_event_inclusive_or_at_a_time() -> None:
    events = _events(5)
    cut, stopped = Until(event_id=events[2].envelope.event_id).cut(events)
    assert cut == events[:3] and stopped
    cut, stopped = Until(time=events[1].envelope.created_at).cut(events)
    assert cut == events[:2] and stopped
    cut, stopped = Until(time=events[4].envelope.created_at + timedelta(days=1)).cut(events)
    assert cut == events and not stopped
    with pytest.raises(ValueError, match="not part of this session"):
        Until(event_id="01a2013f-dbca-717e-94d4-3f771dfcf1df").cut(events)


def test_fold_state_runs_the_agents_projections_in_order() -> None:
    events = _events(3)
    final = registry.make("job.final", {"n": 2}, session_id="s")
    state = fold_state([*events, ReplayedEvent(final, 0, 3)], AGENTS.values())
    assert state == {"n": 2, "status": "final"}
    assert fold_state(events[:1], AGENTS.values()) == {"n": 0, "status": "created"}


def test_summary_says_what_an_action_did_in_words() -> None:
    action = {
        "agent": "planner",
        "input_event_id": "x",
        "input_type": "task.submitted",
        "result": {"steps": 3},
        "emitted": ["e1"],
    }
    text = summary("mesh.action", action, types={"e1": "plan.ready"})
    assert text == 'handled task.submitted → emitted plan.ready; result {"steps":3}'
    assert summary("mesh.action", {**action, "emitted": [], "result": None}) == (
        "handled task.submitted → emitted nothing"
    )
    long = summary("x", {"text": "y" * 500, "items": list(range(10))}, limit=60)
    assert len(long) == 60 and long.endswith("…")
