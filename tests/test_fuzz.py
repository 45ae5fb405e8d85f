"""A few thousand hostile entries at the refund desk's input while valid tickets keep flowing:
every hostile entry is dead-lettered alone with a reason that names what is wrong with it, no
valid ticket is dead-lettered or paid twice, a forged copy of a ticket (its event id reused
with another amount) changes nothing, and the operator's DLQ commands render them all."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

import refund_desk  # noqa: F401  (registers the desk's event types, for Mesh.publish)
from agentmesh import Mesh
from tests.audit_helpers import settings_from
from tests.conftest import AgentProcess, eventually
from tests.helpers import mesh
from tests.hostile import GENERIC, hostile_entries
from tests.refund_helpers import Desk, start_desk

HOSTILE = 2_000
VALID = 60


@pytest.fixture
def desk(
    base_env: dict[str, str],
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
    redis: Redis,  # empty streams, before the agents make their groups
    pg: asyncpg.Connection,  # empty tables
) -> Iterator[Desk]:
    d = start_desk(base_env, agents, tmp_path)
    yield d
    d.gateway.stop()


def _valid(i: int) -> dict[str, object]:
    # ids with markup and brackets are valid ids: they must not be mistaken for hostile ones
    tid = f"V-{i}" if i % 3 else f"V-[/]{i}[link=x]"
    return {"ticket_id": tid, "customer": f"v{i}@example.com", "order_id": f"O-{i}",
            "amount_cents": 1_000 + i, "text": "arrived broken"}  # fmt: skip


async def test_hostile_entries_fail_alone_and_valid_tickets_flow(
    desk: Desk, redis: Redis, pg: asyncpg.Connection
) -> None:
    hostile = hostile_entries(HOSTILE)
    s = settings_from(desk.env)
    async with Mesh(s, operator="fuzz") as client:
        sent = {}
        chunk = 100
        for i in range(0, len(hostile), chunk):  # hostile entries and valid tickets interleaved
            pipe = redis.pipeline(transaction=False)
            for h in hostile[i : i + chunk]:
                pipe.xadd("refund:tickets", h.fields)  # type: ignore[arg-type]
            await pipe.execute()
            for j in range(i * VALID // len(hostile), (i + chunk) * VALID // len(hostile)):
                p = await client.publish("ticket.submitted", _valid(j), session_id=f"valid-{j}")
                sent[p.session_id] = p

        async def settled() -> bool:
            states = {x.session_id: x for x in await client.sessions(limit=5_000)}
            done = [states.get(v) for v in sent]
            return all(x is not None and x.status in ("ended", "waiting") for x in done)

        await eventually(settled, timeout=180, interval=1, what="every valid ticket settled")

        async def all_dead_lettered() -> bool:
            return await client.dlq.depth() >= len(hostile)

        await eventually(all_dead_lettered, timeout=120, interval=1, what="hostile entries in DLQ")
        entries = await client.dlq.list()
        by_raw = defaultdict(list)
        for h in hostile:
            by_raw[h.fields.get(b"envelope", b"")].append(h)
        vague: Counter[str] = Counter()
        wrong: list[tuple[str, str, str]] = []
        for e in entries:
            (h, *_) = by_raw[e.raw] or _cut_from(by_raw, e.raw) or [None]
            assert h is not None, (
                f"a DLQ entry that is not one of the hostile ones: {e.raw[:200]!r}"
            )
            if e.reason in GENERIC:
                vague[f"{h.kind}: {e.reason}"] += 1
            elif e.reason not in h.reasons:
                wrong.append((h.kind, e.reason, e.error[:120]))
        assert not vague, f"dead-lettered for a reason that does not say what is wrong: {vague}"
        assert not wrong, f"reasons that do not fit the entry: {wrong[:10]}"
        assert len(entries) == len(hostile), Counter(h.kind for h in hostile)

        # a forged copy of a handled ticket: its event id, another amount; it must change nothing
        first = next(iter(sent.values()))
        raw = await pg.fetchval("SELECT envelope FROM mesh_outbox WHERE event_id = $1",
                                first.event_id)  # fmt: skip
        forged = json.loads(raw)
        forged["payload"]["amount_cents"] = 9_999_999
        await redis.xadd("refund:tickets", {"envelope": json.dumps(forged)})
        await asyncio.sleep(3)
    paid = desk.gateway.paid()
    assert set(paid.values()) <= {1}, paid
    ledger = [json.loads(x) for x in desk.gateway.ledger.read_text().splitlines() if x.strip()]
    assert all(x["amount_cents"] != 9_999_999 for x in ledger), "a forged copy was paid"

    # the operator's view renders every hostile entry: table, JSON, and each kind's details
    listed = await asyncio.to_thread(mesh, desk.env, "dlq", "list")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr[-2000:]
    assert "\x1b" not in listed.stdout
    as_json = await asyncio.to_thread(mesh, desk.env, "dlq", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    assert len(json.loads(as_json.stdout)) == len(hostile)
    shown: set[str] = set()
    for e in entries:
        kind = (by_raw[e.raw] or _cut_from(by_raw, e.raw))[0].kind
        if kind in shown:
            continue
        shown.add(kind)
        for args in (("dlq", "show", e.id), ("dlq", "show", e.id, "--json")):
            r = await asyncio.to_thread(mesh, desk.env, *args)
            assert r.returncode == 0, (kind, r.stderr[-2000:])
            assert "\x1b" not in r.stdout and "Traceback" not in r.stderr, kind


def _cut_from(by_raw: dict[bytes, list[Any]], cut: bytes) -> list[Any]:
    """The hostile entries an oversize DLQ copy was cut from (the DLQ keeps only its head)."""
    return [h for raw, hs in by_raw.items() if len(raw) > len(cut) and raw.startswith(cut)
            for h in hs]  # fmt: skip
