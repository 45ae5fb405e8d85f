"""Projections: a runner killed -9 in the middle of a batch, and the relay's duplicates in
Kafka, leave the read model equal to a fold of the deduplicated log; replicas share the
partitions; a rebuild gives the same rows and live runners follow it. Real servers."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agentmesh.outbox import kafka
from agentmesh.outbox.projection_apply import prepare_rebuild, swap
from agentmesh.outbox.projection_rebuild import fold_to_end
from agentmesh.settings import Settings
from tests.audit_helpers import backlog, event, insert, metric, read_topic, settings_from
from tests.conftest import MeshProcess, eventually
from tests.helpers import mesh
from tests.projection_fixture import counts, reset

StartRelay = Callable[..., MeshProcess]
MODULE = "tests.projection_fixture"


def dedup_fold(records: list[Any]) -> dict[str, tuple[int, int]]:
    """What the read model must hold: per session, (events, sum of n) over the job.done
    events of the log, each event id once."""
    seen: set[str] = set()
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        try:
            env = json.loads(r.value)
        except ValueError:
            continue  # the forged record
        if env["type"] != "job.done" or env["event_id"] in seen:
            continue
        seen.add(env["event_id"])
        out[env["session_id"]][0] += 1
        out[env["session_id"]][1] += env["payload"]["n"]
    return {k: (v[0], v[1]) for k, v in out.items()}


async def read_model(pg: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    rows = await pg.fetch("SELECT session_id, events, sum_n FROM t_counts")
    return {r[0]: (r[1], r[2]) for r in rows}


async def forge(s: Settings) -> None:
    """A record that is not an envelope, straight into the topic: it must fail alone."""
    p = kafka.producer(s)
    await p.start()
    try:
        await p.send_and_wait(s.audit_topic, b"{not an envelope", key=b"forged", partition=0)
    finally:
        await p.stop()


def status(env: dict[str, str]) -> dict[str, Any]:
    out = mesh(env, "projection", "status", "t_counts", "--json")
    assert out.returncode == 0, out.stderr
    found: dict[str, Any] = json.loads(out.stdout)[0]
    return found


@pytest.fixture
def procs() -> Iterator[list[MeshProcess]]:
    """Processes the test started, stopped after its report (which shows their logs)."""
    started: list[MeshProcess] = []
    yield started
    for p in started:
        p.close()


async def test_killed_runner_and_duplicates_leave_the_fold_of_the_deduplicated_log(
    pg: asyncpg.Connection,
    audit_env: dict[str, str],
    relays: StartRelay,
    tmp_path: Path,
    procs: list[MeshProcess],
) -> None:
    await reset(pg)
    env = {**audit_env, "MESH_PROJECTION_REBALANCE_INTERVAL_S": "0.5"}
    s = settings_from(env)
    rnd = random.Random(15)
    envs = [event(f"p-{i % 40}", rnd.randint(0, 1000)) for i in range(1200)]
    envs.append(event("p-bad", 1).model_copy(update={"payload": {"n": -5}}))  # its fold refuses
    await insert(pg, envs)

    # the relay dies after Kafka acked its round and before it marked the rows: the next relay
    # sends them all again, so the log holds every event twice
    crashed = relays(MESH_CRASH_AT="relay_after_ack")
    assert await asyncio.to_thread(crashed.wait, 60) == 137
    relays()
    await eventually(lambda: _drained(pg), timeout=60, what="outbox published")
    await forge(s)
    records = await read_topic(s)
    expected = dedup_fold(records)
    assert len(records) > 2000, "the relay's duplicates are in the log"
    expected.pop("p-bad")

    # a runner folds two batches of 100, then dies (os._exit) halfway through the third
    run = ["projection", "run", "t_counts", "--module", MODULE]
    first = MeshProcess(run, "projection", env, tmp_path, MESH_CRASH_AT="projection_mid_batch",
                        MESH_CRASH_AFTER="3", MESH_PROJECTION_BATCH_SIZE="100")  # fmt: skip
    procs.append(first)
    assert await asyncio.to_thread(first.wait, 60) == 137, first.log()
    partial = await read_model(pg)
    applied = await pg.fetchval("SELECT count(*) FROM mesh_projection_applied")
    assert 0 < sum(e for e, _ in partial.values()) == applied < 1200  # rows and ids together

    # two replicas share the partitions and finish the job
    procs += [MeshProcess(run, f"projection-{i}", env, tmp_path) for i in range(2)]
    await eventually(lambda: _caught_up(env, two_runners=True), timeout=90,
                     what="both runners folding, no lag")  # fmt: skip
    assert await read_model(pg) == expected
    st = status(env)
    assert st["skipped"] == 2  # the forged record and the refused event, each alone
    folded = 0.0
    for proc in procs[1:]:  # each runner's /metrics
        port = re.search(r"http_port=(\d+)", proc.log())
        assert port, proc.log()
        folded += await metric(int(port.group(1)), "mesh_projection_folded_total")
    assert folded > 0
    reasons = " | ".join(r[0] for r in await pg.fetch("SELECT reason FROM mesh_projection_skipped"))
    assert "not an envelope" in reasons and "ValueError: job.done without a usable n" in reasons

    # the CLI's query and the table view
    out = await asyncio.to_thread(mesh, env, "projection", "query", "t_counts", "all",
                                  "--module", MODULE, "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert {r["session_id"]: (r["events"], r["sum_n"]) for r in json.loads(out.stdout)} \
        == expected  # fmt: skip
    out = await asyncio.to_thread(mesh, env, "projection", "status")
    assert out.returncode == 0 and "t_counts" in out.stdout and "lag 0" in out.stdout
    for args, code, says in (
        (["run", "nosuch", "--module", MODULE], 2, "no projection 'nosuch' is declared"),
        (["query", "t_counts", "nosuch", "--module", MODULE], 2, "has no query 'nosuch'"),
        (["status", "nosuch"], 1, "projection 'nosuch' has never run here"),
    ):
        out = await asyncio.to_thread(mesh, env, "projection", *args)
        assert out.returncode == code and says in out.stderr, out.stderr
        assert "Traceback" not in out.stderr

    # a rebuild folds the whole log into a fresh table and swaps it in: the same rows
    out = await asyncio.to_thread(mesh, env, "projection", "rebuild", "t_counts",
                                  "--module", MODULE, "--json")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rebuilt = json.loads(out.stdout)
    assert rebuilt["generation"] == 2 and rebuilt["duplicates"] > 1000
    assert await read_model(pg) == expected
    assert not await pg.fetchval("SELECT to_regclass('t_counts_g1') IS NOT NULL")

    # the live runners move to the new generation with the next events
    more = [event("p-0", 3), event("p-new", 4)]
    await insert(pg, more)
    await eventually(lambda: _drained(pg), timeout=60, what="outbox published")
    expected["p-0"] = (expected["p-0"][0] + 1, expected["p-0"][1] + 3)
    expected["p-new"] = (1, 4)
    await eventually(lambda: _equals(pg, expected), timeout=60, what="new events folded")
    assert status(env)["generation"] == 2

    # a rebuild that an event overtakes: generation 3 is folded to the end, then an event
    # arrives and the live runners fold it into generation 2, then the swap. Nothing else
    # arrives, yet the runners follow the swap and fold that event into generation 3 too.
    pool = await asyncpg.create_pool(s.postgres_dsn, min_size=1, max_size=2)
    try:
        old, new = await prepare_rebuild(pg, counts, s.audit_topic)
        await fold_to_end(s, counts, pool, new, live=False)
        await insert(pg, [event("p-late", 5)])
        expected["p-late"] = (1, 5)
        await eventually(lambda: _equals(pg, expected), timeout=60, what="folded into gen 2")
        await swap(pg, counts, old, new)
        assert "p-late" not in await read_model(pg)  # the new table, before the runners move
        await eventually(lambda: _equals(pg, expected), timeout=60, what="folded into gen 3")
    finally:
        await pool.close()


async def _drained(pg: asyncpg.Connection) -> bool:
    return await backlog(pg) == 0


async def _equals(pg: asyncpg.Connection, expected: dict[str, tuple[int, int]]) -> bool:
    return await read_model(pg) == expected


async def _caught_up(env: dict[str, str], *, two_runners: bool) -> bool:
    st = await asyncio.to_thread(status, env)
    parts = st["partitions"]
    pids = {p["runner_pid"] for p in parts}
    return bool(
        len(parts) == 4
        and st["lag"] == 0
        and (not two_runners or (st["runners"] == 2 and len(pids) == 2 and None not in pids))
    )
