"""Long sessions: `mesh replay --state` of a 5,000-event session starts from the snapshot the
projection runner took and reads only the tail, and equals the fold of the whole log; a
snapshot that no longer stands for a prefix of the log is not used. Real servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from agentmesh.agents.agent import AGENTS
from agentmesh.outbox.replay import fold_state, replay_session
from agentmesh.outbox.snapshots import replay_state
from tests.audit_helpers import drain_outbox, event, insert, settings_from
from tests.conftest import MeshProcess, eventually
from tests.helpers import mesh
from tests.projection_fixture import reset

MODULE = "tests.projection_fixture"


@pytest.fixture
def procs() -> Iterator[list[MeshProcess]]:
    started: list[MeshProcess] = []
    yield started
    for p in started:
        p.close()


async def test_state_of_a_5000_event_session_reads_the_snapshot_and_the_tail(
    pg: asyncpg.Connection, audit_env: dict[str, str], tmp_path: Path, procs: list[MeshProcess]
) -> None:
    await reset(pg)
    env = {**audit_env, "MESH_SNAPSHOT_EVERY": "1000", "MESH_AGENTS_MODULE": MODULE}
    s = settings_from(env)
    for k in range(5):  # 5,000 events of one session, beside a short one
        await insert(pg, [event("long", k * 1000 + i) for i in range(1000)])
        await insert(pg, [event("short", k)])
    await drain_outbox(s, pg)

    procs.append(MeshProcess(["projection", "run", "mesh_sessions"], "snapshots", env, tmp_path))
    snap = await eventually(lambda: _snapshot(pg), timeout=90, what="a snapshot of 5,000 events")
    assert snap["events"] == 5000
    assert not await pg.fetchval("SELECT count(*) FROM mesh_session_snapshots "
                                 "WHERE session_id = 'short'")  # fmt: skip

    assert procs[0].terminate() == 0  # SIGTERM: it stops after its batch
    await insert(pg, [event("long", 10_000 + i) for i in range(37)])  # the tail
    await drain_outbox(s, pg)

    agents = list(AGENTS.values())
    fast = await replay_state(s, "long", agents)
    full = await replay_session(s, "long")
    assert fast.snapshot is not None and fast.snapshot.events == 5000
    assert len(fast.replay.events) == 37 and fast.events == 5037
    assert fast.replay.records_read < 100  # the tail (and little else), not 5,037 records
    assert full.records_read >= 5037
    whole = fold_state(full.events, agents)
    assert whole["count"] == 5037 and fast.state == whole

    # the CLI says where it started, and reads as little
    out = await asyncio.to_thread(mesh, env, "replay", "long", "--state", "--json")
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.splitlines()[-1])
    assert last["state"] == whole and last["snapshot"]["events"] == 5000
    assert last["snapshot"]["records_read_after"] < 100
    out = await asyncio.to_thread(mesh, env, "replay", "long", "--state")
    assert out.returncode == 0 and "from the snapshot of 5000 events" in out.stdout, out.stdout

    # a row the snapshot counts on is no longer where it says (as after a republish):
    # the snapshot is not used, the whole session is read, the state is the same
    await pg.execute(
        "UPDATE mesh_outbox SET kafka_offset = kafka_offset + 100000 WHERE id = "
        "(SELECT min(id) FROM mesh_outbox WHERE session_id = 'long')"
    )
    again = await replay_state(s, "long", agents)
    assert again.snapshot is None and again.replay.records_read >= 5037
    assert again.state == whole


async def _snapshot(pg: asyncpg.Connection) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pg.fetchrow(
        "SELECT events FROM mesh_session_snapshots WHERE session_id = 'long' AND events >= 5000"
    )
    return row


def test_a_cursor_keeps_only_the_spans_after_it() -> None:
    from agentmesh.outbox.replay import Cursor, _past

    spans = [(1, 0, 40), (1, 900, 950), (1, 2000, -1), (2, 0, 10)]
    assert _past(spans, Cursor(1, 40, 7)) == [(1, 900, 950), (1, 2000, -1)]
    assert _past(spans, Cursor(1, 920, 7)) == [(1, 921, 950), (1, 2000, -1)]
    assert _past(spans, Cursor(1, 5000, 7)) == [(1, 5001, -1)]  # to the end: the tail


def test_a_projection_names_its_table_and_queries_safely() -> None:
    from agentmesh import Projection

    for bad in ("Refunds", "x; DROP TABLE y", "", "1st"):
        with pytest.raises(ValueError, match="lower-case"):
            Projection(bad, table="CREATE TABLE {table} (x int)", register=False)
    with pytest.raises(ValueError, match="must name its table"):
        Projection("p", table="CREATE TABLE p (x int)", register=False)
    queries = {"all": "SELECT * FROM {table}", "n": "SELECT count(*) FROM {table}"}
    p = Projection("p", table="CREATE TABLE {table} (x int)", queries=queries, register=False)
    assert p.table_of(3) == "p_g3"
    assert p.query_sql(None) == ("all", "SELECT * FROM p")  # the live view
    assert p.query_sql("n") == ("n", "SELECT count(*) FROM p")
    with pytest.raises(KeyError):
        p.query_sql("other")
