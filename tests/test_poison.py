"""Poison that used to stop an agent for good, and crash loops that used to dead-letter the
innocent: one entry's fault stays that entry's, against real Redis, PostgreSQL and agent
processes (and the pure parts without a server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel, field_validator
from redis.asyncio import Redis

from agentmesh.agents.agent import HandlerSpec
from agentmesh.agents.consumer import ConsumerLoop
from agentmesh.agents.consumer_deps import ConsumerDeps
from agentmesh.agents.isolation import Gate, split, suspect_after
from agentmesh.agents.metrics import Metrics
from agentmesh.bus import Streams
from agentmesh.schemas import Envelope, Registry, registry
from agentmesh.schemas.depth import MAX_DEPTH, depth, too_deep
from agentmesh.schemas.errors import (
    DecodeError,
    InvalidEncoding,
    MalformedJSON,
    SchemaViolation,
    TooDeep,
    ValidatorError,
)
from agentmesh.settings import Settings
from tests.conftest import AgentProcess, eventually
from tests.helpers import actions, dlq, group_state, job, publish, stream_events

Start = Callable[..., AgentProcess]


# -- the depth check, without a server ---------------------------------------------------------
def _nested(levels: int, inner: bytes = b"1") -> bytes:
    return b"[" * levels + inner + b"]" * levels


def test_depth_fast_path_never_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    import agentmesh.schemas.depth as d

    def no_scan(raw: bytes) -> int:
        raise AssertionError("scanned an entry with fewer brackets than the cap")

    monkeypatch.setattr(d, "depth", no_scan)
    assert not d.too_deep(_nested(MAX_DEPTH))  # exactly the cap: allowed
    assert not d.too_deep(b'{"a": [1, {"b": 2}], "c": "x"}')
    assert not d.too_deep(b"")


def test_depth_precise_scan_skips_brackets_in_strings() -> None:
    assert depth(b'{"a": [1, {"b": 2}]}') == 3
    assert depth(b"[]" * 500) == 1  # many brackets, shallow: the scan says no
    assert not too_deep(b"[]" * 500)
    in_string = b'{"s": "' + b"[{" * 300 + b'"}'
    assert depth(in_string) == 1 and not too_deep(in_string)
    # an escaped quote does not end a string; an escaped backslash before a quote does
    assert depth(b'["a\\"[[[[", [1]]') == 2
    assert depth(b'["a\\\\", [[[1]]]]') == 4
    # a string left open hides nothing: that JSON fails to parse anyway
    assert depth(b'["' + b"[" * 100) == 1
    assert too_deep(_nested(MAX_DEPTH + 1))
    assert not too_deep(_nested(MAX_DEPTH, b'"' + b"[" * 200 + b'"'))
    assert depth(_nested(5_000)) == 5_000
    assert depth(b"{" * 70 + b"}" * 70) == 70  # objects count like arrays


def _registry() -> Registry:
    class Doc(BaseModel):
        body: Any = None
        ratio: int = 1

        @field_validator("ratio")
        @classmethod
        def _div(cls, v: int) -> int:
            return 100 // v  # ZeroDivisionError for 0: a bug, not a ValidationError

    reg = Registry()
    reg.register("doc.sent", Doc, stream="docs")
    return reg


def _wire(reg: Registry, body: Any = None, **payload: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(reg.make("doc.sent", {}, session_id="s").to_wire())
    out["payload"].update(body=body, **payload)
    return out


def test_decode_names_every_failure_of_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry()
    ok = _wire(reg)
    deep = json.dumps(ok)[:-1].encode() + b', "x": ' + _nested(5_000) + b"}"
    with pytest.raises(TooDeep):
        reg.decode(deep)
    # the deepest envelope allowed: its own object, the payload, and 62 levels of body
    assert reg.decode(json.dumps(_wire(reg, json.loads(_nested(MAX_DEPTH - 2)))).encode())
    with pytest.raises(TooDeep):
        reg.decode(json.dumps(_wire(reg, json.loads(_nested(MAX_DEPTH - 1)))).encode())
    with pytest.raises(InvalidEncoding):
        reg.decode(json.dumps(ok).encode().replace(b"doc.sent", b"doc.\xffsent"))
    with pytest.raises(InvalidEncoding):  # a surrogate encoded as UTF-8 bytes
        reg.decode(json.dumps(ok).encode().replace(b'"s"', b'"\xed\xa0\x80"'))
    with pytest.raises(InvalidEncoding):  # a lone surrogate escaped, where Any keeps it
        reg.decode(json.dumps(_wire(reg, "\ud800")).encode())
    with pytest.raises(InvalidEncoding):
        reg.decode(json.dumps(ok).replace('"s"', '"\ud800"', 1))  # str in, surrogate in it
    # a valid pair, and text that only looks like an escape, are fine
    assert reg.decode(json.dumps(_wire(reg, "\U0001f600")).encode()).payload.body == "\U0001f600"  # type: ignore[attr-defined]
    assert reg.decode(json.dumps(_wire(reg, "\\ud800")).encode())
    assert reg.decode(b"\xef\xbb\xbf" + json.dumps(ok).encode())  # a UTF-8 BOM, as before
    with pytest.raises(ValidatorError, match="ZeroDivisionError"):
        reg.decode(json.dumps(_wire(reg, ratio=0)).encode())
    with pytest.raises(MalformedJSON):
        reg.decode(b"")

    def broken(data: Any) -> Any:
        raise KeyError("nobody foresaw this")

    monkeypatch.setattr(Envelope, "model_validate", broken)
    with pytest.raises(DecodeError, match="KeyError"):
        reg.decode(json.dumps(ok).encode())


def test_upcaster_errors_stay_schema_violations() -> None:
    reg = _registry()

    class Doc2(BaseModel):
        body: Any = None

    reg.register("doc.v", Doc2, stream="docs", version=2)

    @reg.upcaster("doc.v", 1)
    def boom(p: dict[str, Any]) -> dict[str, Any]:
        raise RecursionError("deep inside")

    raw = json.dumps({**_wire(reg), "type": "doc.v", "schema_version": 1}).encode()
    with pytest.raises(SchemaViolation, match="upcaster"):
        reg.decode(raw)


# -- the isolation rule, without a server ------------------------------------------------------
def test_suspects_are_entries_delivered_twice_without_completing() -> None:
    assert suspect_after(5) == 2 and suspect_after(3) == 2
    assert suspect_after(2) == 1  # its one run alone must fit under the limit
    idle = [("1-0", 1), ("2-0", 2), ("3-0", 4), ("4-0", 5), ("5-0", 9)]
    batch, alone = split(idle, max_deliveries=5)
    assert batch == ["1-0", "4-0", "5-0"]  # a first victim; two at the limit: DLQ, no run
    assert alone == ["2-0", "3-0"]


class _Loop:
    def __init__(self) -> None:
        self.n = 0

    def in_flight(self) -> int:
        return self.n


async def test_gate_waits_until_nothing_of_the_process_is_in_flight() -> None:
    gate, a, b = Gate(), _Loop(), _Loop()
    gate.join(a)
    gate.join(b)
    b.n = 3
    entered = asyncio.Event()

    async def isolate() -> None:
        async with gate.alone(a, lambda: False) as ok:
            assert ok and b.n == 0
            assert gate.closed_to(b) and not gate.closed_to(a)
            entered.set()

    task = asyncio.create_task(isolate())
    await asyncio.sleep(0.1)
    assert not entered.is_set() and gate.closed_to(b), "b still has entries in flight"
    b.n = 0
    gate.settled()
    await asyncio.wait_for(task, 2)
    assert not gate.closed_to(b)


async def test_idle_pending_lists_without_claiming(redis: Redis) -> None:
    bus = Streams(redis, group="g", consumer="c1")
    await bus.ensure_group("s")
    await redis.xadd("s", {"envelope": b"{}"})
    await redis.xadd("s", {"envelope": b"{}"})
    (first, second) = await bus.read(["s"], count=10, block_ms=None)
    other = Streams(redis, group="g", consumer="c2")
    idle = await other.idle_pending("s", min_idle_ms=0, count=10)
    assert idle == [(first.id, 1), (second.id, 1)]
    assert await other.idle_pending("s", min_idle_ms=60_000, count=10) == []
    assert await other.idle_pending("s", min_idle_ms=0, count=10) == idle  # still uncounted
    (taken,) = await other.claim("s", [second.id], min_idle_ms=0)
    assert taken.id == second.id and taken.deliveries == 2
    assert await bus.claim("s", [second.id], min_idle_ms=60_000) == []  # c2 just took it
    await redis.xdel("s", first.id)
    assert await other.claim("s", [first.id], min_idle_ms=0) == []  # deleted: left out


class _BuggyRegistry:
    """The mesh's registry, except that one entry meets a bug outside decoding proper."""

    def decode(self, raw: bytes) -> Any:
        if raw == b"bug":
            raise RuntimeError("a bug nobody foresaw")
        return registry.decode(raw)


class _NoPool:
    async def fetch(self, *args: Any) -> list[Any]:
        return []  # nothing committed yet: no redelivery


async def test_admit_dead_letters_one_entry_on_any_error_and_respects_the_gate(
    redis: Redis, stack: Any
) -> None:
    ran: list[int] = []

    async def handle(j: Any, ctx: Any) -> dict[str, int]:
        ran.append(j.n)
        return {}

    agent = SimpleNamespace(
        name="probe",
        registry=_BuggyRegistry(),
        handlers={"job.created": HandlerSpec("job.created", handle, ())},
        streams=["t:jobs"],
        emits=set(),
    )
    deps = ConsumerDeps(
        settings=Settings(redis_url=stack.redis_url),
        agent=agent,  # type: ignore[arg-type]
        redis=redis,
        pool=_NoPool(),  # type: ignore[arg-type]
        metrics=Metrics(),
        dependencies={},
        paused_streams=lambda: (set(), set()),
        stream_modes=lambda: (["t:jobs"], []),
        stop_event=asyncio.Event(),
    )
    loop = ConsumerLoop(deps, "probe-1")
    await loop.streams.ensure_group("t:jobs")
    await publish(redis, [job(1)])
    await redis.xadd("t:jobs", {"envelope": b"bug"})
    await publish(redis, [job(2)])
    batch = await loop.streams.read(["t:jobs"], count=10, block_ms=None)
    await loop.admit(batch)
    (letter,) = await dlq(redis)
    assert letter["envelope"] == "bug" and letter["reason"] == "decode_error"
    assert letter["error_type"] == "RuntimeError" and "Traceback" in letter["traceback"]
    await asyncio.gather(*loop.tasks)
    assert sorted(ran) == [1, 2], "its batch-mates went on"

    # while another loop of the process runs a suspect alone, this one starts nothing
    loop.inflight.clear()  # (no committer here settles them)
    async with loop.gate.alone(_Loop(), lambda: False):
        await publish(redis, [job(3)])
        await loop.admit(await loop.streams.read(["t:jobs"], count=10, block_ms=None))
        assert not loop.tasks and loop.in_flight() == 0
        assert [r.count for r in loop.retries] == [False], "parked, uncounted"
    assert sorted(ran) == [1, 2]


# -- real agents ------------------------------------------------------------------------------
async def _drained(redis: Redis) -> bool:
    st = await group_state(redis, "t:jobs", "worker")
    return bool(st) and st["pending"] == 0 and st["lag"] == 0


async def _handled_once(redis: Redis, pg: asyncpg.Connection, sent: list[Any]) -> None:
    ids = {e.event_id for e in sent}
    rows = await pg.fetch(
        "SELECT input_event_id::text AS id, count(*) AS c FROM mesh_actions "
        "WHERE agent = 'worker' GROUP BY 1"
    )
    assert {r["id"] for r in rows} == ids and all(r["c"] == 1 for r in rows)
    causes = [e.causation_id for e in await stream_events(redis, "t:done")]
    assert sorted(causes) == sorted(ids), "one handoff per valid job"


async def test_hostile_entries_go_alone_and_the_agent_reads_on(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    base = json.loads(job(0).to_wire())

    def hostile(n: int, **payload: Any) -> dict[str, Any]:
        return {**base, "event_id": job(n).event_id, "payload": {"n": n, **payload}}

    deep = json.dumps(hostile(1))[:-1].encode() + b', "x": ' + _nested(5_000) + b"}"
    not_utf8 = json.dumps(hostile(2)).encode().replace(b"job.created", b"job.\xffcreated")
    bad: dict[str, tuple[bytes, str]] = {  # name: (raw, the DLQ reason it must get)
        "deep": (deep, "too_deep"),
        "utf8": (not_utf8, "invalid_encoding"),
        "validator": (json.dumps(hostile(3, fail="in_validator")).encode(), "validator_error"),
        "surrogate": (json.dumps(hostile(4, note="\ud800")).encode(), "invalid_encoding"),
    }
    first = [job(100 + i, session=f"v-{i}") for i in range(30)]
    # one read of them all: the hostile ones in the middle of valid ones
    await publish(redis, first[:15])
    for raw, _ in bad.values():
        await redis.xadd("t:jobs", {"envelope": raw})
    await publish(redis, first[15:])
    p = agents("worker")

    async def settled() -> bool:
        return int(await redis.xlen("mesh:dlq")) >= len(bad) and await actions(pg, "worker") >= 30

    await eventually(settled, timeout=30, what="hostile entries dead-lettered, valid ones done")
    later = [job(200 + i, session=f"w-{i}") for i in range(20)]
    await publish(redis, later)
    await eventually(lambda: _drained(redis), timeout=30, what="later entries read and handled")
    await eventually(lambda: _at_least(pg, 50), what="later entries committed")
    assert p.alive()
    letters = {d["envelope"]: d for d in await dlq(redis)}
    assert len(letters) == len(bad)
    for name, (raw, reason) in bad.items():
        d = letters[raw.decode(errors="replace")]
        assert d["reason"] == reason, (name, d["reason"], d["error"])
        assert d["deliveries"] == "1", f"{name}: dead-lettered at once"
    await _handled_once(redis, pg, first + later)
    for e in first + later:
        assert int(await redis.get(f"t:runs:{e.event_id}") or 0) == 1
    log = p.log()
    assert "loop error" not in log and "suspect" not in log


async def _at_least(pg: asyncpg.Connection, n: int) -> bool:
    return await actions(pg, "worker") >= n


async def test_a_crash_loop_dead_letters_only_the_entry_that_crashes(
    redis: Redis, pg: asyncpg.Connection, agents: Start
) -> None:
    valid = [job(i, session=f"c-{i}", sleep_ms=300) for i in range(12)]
    crasher = job(99, session="crash", sleep_ms=50, fail="crash")
    await publish(redis, [*valid[:5], crasher, *valid[5:]])  # all in flight at the first crash
    env = {"MESH_MAX_DELIVERIES": "3"}
    p = agents("worker", **env)
    deaths = 0

    async def done() -> bool:
        nonlocal p, deaths
        if not p.alive():  # as a container runtime would: start it again
            assert p.wait(5) == 1, p.log()[-3000:]
            deaths += 1
            assert deaths <= 6, "more crashes than max_deliveries can explain"
            p = agents("worker", **env)
        return await redis.xlen("mesh:dlq") > 0 and await _drained(redis)

    await eventually(done, timeout=120, interval=0.2, what="crasher dead-lettered, rest done")
    letters = await dlq(redis)
    names = {e.event_id: e.payload["n"] for e in [*valid, crasher]}
    assert [names[json.loads(d["envelope"])["event_id"]] for d in letters] == [99], (
        "only the job that crashes is dead-lettered"
    )
    (letter,) = letters
    assert letter["reason"] == "max_deliveries" and letter["deliveries"] == "4"
    # it ran max_deliveries times, and each of its crashes was its own
    assert int(await redis.get(f"t:runs:{crasher.event_id}") or 0) == 3
    assert deaths == 3
    await _handled_once(redis, pg, valid)
    assert p.alive()
