"""Runtime throughput: agentmesh vs a raw redis-py loop vs FastStream, same servers, one run.

    python bench/runtime_throughput.py [--messages N] [--naive-messages M] [--no-write]

Starts its own Redis + PostgreSQL (agentmesh.devstack, free ports, a temp dir), applies the
migrations, and for each variant: empties Redis and the tables, pre-fills the input stream
(not timed), starts the consumer and times it until the group has nothing pending and no
lag. Every message is handled by a trivial handler that emits one handoff event. The
servers are stopped at the end, also on error or Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import asyncpg  # noqa: E402
from _procs import MeshProcs  # noqa: E402
from _report import machine_info, version, write_section  # noqa: E402
from bench_agent import (  # noqa: E402
    AGENT_NAME,
    IN_STREAM,
    IN_TYPE,
    OUT_STREAM,
    BenchIn,
    bench_agent,
)
from redis.asyncio import Redis  # noqa: E402

from agentmesh import devstack  # noqa: E402
from agentmesh.agents.runner import Runner  # noqa: E402
from agentmesh.outbox.migrate import migrate  # noqa: E402
from agentmesh.process.logs import configure as configure_logs  # noqa: E402
from agentmesh.schemas import registry  # noqa: E402
from agentmesh.schemas.envelope import Envelope  # noqa: E402
from agentmesh.settings import Settings  # noqa: E402

SECTION = "## Runtime throughput (Redis Streams + Postgres group commit)"
DOC = ROOT / "docs" / "benchmarks.md"
BATCH = 200
RAW_GROUP = "bench-raw"
FS_GROUP = "bench-faststream"
POLL_S = 0.01
NAIVE_DEFAULT = 4_000
NAIVE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_naive (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    envelope text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
NAIVE_INSERT = "INSERT INTO bench_naive (event_id, envelope) VALUES ($1, $2)"


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    name: str
    messages: int
    seconds: float | None = None
    note: str = ""
    checks: list[str] = field(default_factory=list)
    key: str = ""
    half_s: float | None = None  # when half of the input was done
    rss_mb: float | None = None  # the largest agent process's resident memory, once drained
    cpu_s: float | None = None  # CPU time the consumer's process(es) used for the run

    @property
    def cpu_us(self) -> float | None:
        """CPU microseconds per message: unlike msgs/s, hardly moved by other load."""
        return None if self.cpu_s is None else self.cpu_s / self.messages * 1e6

    @property
    def halves(self) -> tuple[float, float] | None:
        """msgs/s over the first and the second half of the run."""
        if self.seconds is None or self.half_s is None or not 0 < self.half_s < self.seconds:
            return None
        half = self.messages / 2
        return half / self.half_s, half / (self.seconds - self.half_s)

    @property
    def rate(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.messages / self.seconds


class Stack:
    """The servers of this run plus one Redis client and one Postgres connection for setup."""

    def __init__(self, cfg: devstack.StackConfig, redis: Redis, pg: asyncpg.Connection) -> None:
        self.cfg = cfg
        self.redis = redis
        self.pg = pg

    async def reset(self) -> None:
        """Empty Redis and the tables; compact the AOF and checkpoint so runs start alike."""
        await self.redis.flushall()
        await self.pg.execute(
            "TRUNCATE mesh_idempotency, mesh_actions, mesh_outbox, bench_naive RESTART IDENTITY"
        )
        await self.pg.execute("CHECKPOINT")
        with contextlib.suppress(Exception):  # a rewrite may already be running
            await self.redis.bgrewriteaof()
        for _ in range(500):
            info = await self.redis.info("persistence")
            if not int(info.get("aof_rewrite_in_progress", 0)) and not int(
                info.get("aof_rewrite_scheduled", 0)
            ):
                break
            await asyncio.sleep(0.02)

    async def prefill(self, stream: str, wires: Sequence[bytes], fld: bytes = b"envelope") -> None:
        for i in range(0, len(wires), 1000):
            pipe = self.redis.pipeline(transaction=False)
            for w in wires[i : i + 1000]:
                pipe.xadd(stream, {fld: w})
            await pipe.execute()

    async def create_group(self, stream: str, group: str, start: str = "0") -> None:
        await self.redis.xgroup_create(stream, group, id=start, mkstream=True)

    async def remaining(self, stream: str, group: str) -> int:
        """Entries of `stream` the group has not acked yet (pending + lag); -1: no group."""
        for g in await self.redis.xinfo_groups(stream):
            if _s(g["name"]) != group:
                continue
            pending = int(g["pending"])
            lag = g.get("lag")
            if lag is None:  # Redis cannot tell: compare the last delivered id instead
                info = await self.redis.xinfo_stream(stream)
                lag = 0 if g["last-delivered-id"] == info["last-generated-id"] else 1
            return pending + int(lag)
        return -1

    async def time_drain(
        self,
        res: Result,
        t0: float,
        stream: str,
        group: str,
        *,
        watch: Sequence[asyncio.Future[Any]] = (),
        alive: Callable[[], None] | None = None,
    ) -> None:
        """Poll until the group is done; set res.seconds (and res.half_s, when half of the
        input was done) from t0. A finished `watch` task or a raising `alive` aborts."""
        deadline = t0 + _timeout(res.messages)
        while True:
            left = await self.remaining(stream, group)
            now = time.monotonic()
            if res.half_s is None and 0 <= left <= res.messages // 2:
                res.half_s = now - t0
            if left == 0:
                res.seconds = now - t0
                return
            for t in watch:
                if t.done():
                    exc = t.exception()
                    raise RuntimeError(f"consumer stopped early: {exc!r}") from exc
            if alive is not None:
                alive()
            if now > deadline:
                raise TimeoutError(f"not drained after {now - t0:.0f}s ({left} entries left)")
            await asyncio.sleep(POLL_S)

    async def check_out(self, res: Result, expected: int) -> None:
        n = int(await self.redis.xlen(OUT_STREAM))
        if n != expected:
            res.checks.append(f"{OUT_STREAM} has {n} entries, expected {expected}")


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def make_inputs(n: int) -> list[bytes]:
    text = "benchmark payload " * 3
    return [
        registry.make(IN_TYPE, BenchIn(n=i, text=text), session_id=f"bench-{i % 64}").to_wire()
        for i in range(n)
    ]


def _timeout(n: int) -> float:
    return max(60.0, n / 100)


# ----------------------------------------------------------------------------- 1 + 2: raw


def raw_handoff(env: dict[str, Any]) -> bytes:
    """The trivial handler, by hand: the input decoded, one handoff envelope encoded."""
    event_id = str(uuid.uuid4())
    out = {
        "event_id": event_id,
        "session_id": env["session_id"],
        "causation_id": env["event_id"],
        "type": "bench.out",
        "schema_version": 1,
        "source": "raw",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "idempotency_key": event_id,
        "payload": {"n": env["payload"]["n"]},
    }
    return json.dumps(out).encode()


async def raw_loop(redis: Redis, stop: asyncio.Event, pg: asyncpg.Connection | None) -> None:
    """XREADGROUP 200 -> handle -> (one Postgres tx per message) -> XADDs + XACK, pipelined."""
    while not stop.is_set():
        reply: Any = await redis.xreadgroup(
            RAW_GROUP, "raw-1", {IN_STREAM: ">"}, count=BATCH, block=100
        )
        if not reply:
            continue
        entries: list[tuple[bytes, dict[bytes, bytes]]] = [
            e for _, batch in (reply.items() if isinstance(reply, dict) else reply) for e in batch
        ]
        pipe = redis.pipeline(transaction=False)
        ids: list[bytes] = []
        for entry_id, fields in entries:
            env = json.loads(fields[b"envelope"])
            out = raw_handoff(env)
            if pg is not None:
                async with pg.transaction():
                    await pg.execute(NAIVE_INSERT, uuid.UUID(env["event_id"]), out.decode())
            pipe.xadd(OUT_STREAM, {b"envelope": out})
            ids.append(entry_id)
        pipe.xack(IN_STREAM, RAW_GROUP, *ids)
        await pipe.execute()


async def bench_raw(stack: Stack, wires: Sequence[bytes], *, with_pg: bool) -> Result:
    name = (
        "raw redis-py loop + 1 Postgres tx per message (naive outbox)"
        if with_pg
        else "raw redis-py loop, no Postgres (ceiling)"
    )
    res = Result(name, len(wires))
    await stack.reset()
    await stack.prefill(IN_STREAM, wires)
    await stack.create_group(IN_STREAM, RAW_GROUP)
    redis = Redis.from_url(stack.cfg.redis_url)
    pg = await asyncpg.connect(stack.cfg.postgres_dsn) if with_pg else None
    stop = asyncio.Event()
    try:
        t0, c0 = time.monotonic(), time.process_time()
        task = asyncio.create_task(raw_loop(redis, stop, pg))
        await stack.time_drain(res, t0, IN_STREAM, RAW_GROUP, watch=[task])
        res.cpu_s = time.process_time() - c0
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await redis.aclose()
        if pg is not None:
            await pg.close()
    await stack.check_out(res, len(wires))
    if with_pg:
        rows = await stack.pg.fetchval("SELECT count(*) FROM bench_naive")
        if rows != len(wires):
            res.checks.append(f"bench_naive has {rows} rows, expected {len(wires)}")
    return res


# ----------------------------------------------------------------------------- 3: agentmesh


def runner_settings(cfg: devstack.StackConfig, consumers: int) -> Settings:
    return Settings(
        redis_url=cfg.redis_url,
        postgres_dsn=cfg.postgres_dsn,
        http_port=0,
        batch_size=BATCH,
        consumers=consumers,
        grace_s=5.0,
        log_level="WARNING",
    )


async def check_mesh_rows(stack: Stack, res: Result, n: int) -> None:
    actions = await stack.pg.fetchval("SELECT count(*) FROM mesh_actions")
    outbox = await stack.pg.fetchval("SELECT count(*) FROM mesh_outbox WHERE stream IS NOT NULL")
    if actions != n or outbox != n:
        res.checks.append(f"mesh_actions={actions}, handoff outbox rows={outbox}, expected {n}")


async def bench_runtime(stack: Stack, wires: Sequence[bytes], *, consumers: int) -> Result:
    res = Result(f"agentmesh Runner in-process, batch {BATCH}, consumers={consumers}", len(wires))
    await stack.reset()
    await stack.prefill(IN_STREAM, wires)
    runner = Runner(bench_agent, runner_settings(stack.cfg, consumers))
    started = False
    try:
        t0 = time.monotonic()
        await runner.start()
        started = True
        await stack.time_drain(res, t0, IN_STREAM, AGENT_NAME, watch=runner._tasks)
    finally:
        if started:
            t_stop = time.monotonic()
            await runner.stop()
            stop_s = time.monotonic() - t_stop
            if stop_s > 2:
                res.checks.append(f"Runner.stop() took {stop_s:.1f}s")
    await stack.check_out(res, len(wires))
    await check_mesh_rows(stack, res, len(wires))
    return res


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def agent_procs(cfg: devstack.StackConfig, n: int, log_dir: Path) -> MeshProcs:
    """`mesh agent run bench-agent` processes."""
    env = dict(os.environ)  # MESH_* knobs set by the caller apply here too
    env.update(
        MESH_REDIS_URL=cfg.redis_url,
        MESH_POSTGRES_DSN=cfg.postgres_dsn,
        MESH_HTTP_PORT="0",
        MESH_BATCH_SIZE=str(BATCH),
        MESH_GRACE_S="5",
        MESH_LOG_LEVEL="WARNING",
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
    )
    return MeshProcs(["agent", "run", AGENT_NAME, "-m", "bench_agent"], "agent", n, env, log_dir)


async def blocked_readers(redis: Redis) -> int:
    """Clients blocked in XREADGROUP right now (a consumer that never got an entry is not
    listed by XINFO CONSUMERS on Redis 7.0, so ask CLIENT LIST)."""
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", ""))


async def bench_processes(stack: Stack, wires: Sequence[bytes], *, procs: int) -> Result:
    """N `mesh agent run` processes. They are started on a group parked at the end of the
    stream (nothing to read) and the clock starts when the group is rewound to 0 and one
    last entry is added, which wakes the blocked readers: no interpreter start-up is timed."""
    res = Result(
        f"agentmesh `mesh agent run` x{procs} processes, batch {BATCH}, 1 consumer each",
        len(wires),
    )
    await stack.reset()
    await stack.prefill(IN_STREAM, wires[:-1])
    await stack.create_group(IN_STREAM, AGENT_NAME, start="$")
    log_dir = Path(tempfile.mkdtemp(prefix="agents-", dir=stack.cfg.root))
    agents = agent_procs(stack.cfg, procs, log_dir)
    try:
        deadline = time.monotonic() + 60
        while await blocked_readers(stack.redis) < procs:  # each process waits in XREADGROUP
            agents.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("agent processes did not start reading within 60s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        cpu0 = sum(cpu_s(p.pid) for p in agents.procs)
        t0 = time.monotonic()
        await stack.redis.xgroup_setid(IN_STREAM, AGENT_NAME, "0", entries_read=0)
        await stack.redis.xadd(IN_STREAM, {b"envelope": wires[-1]})
        await stack.time_drain(res, t0, IN_STREAM, AGENT_NAME, alive=agents.check_alive)
        res.cpu_s = sum(cpu_s(p.pid) for p in agents.procs) - cpu0
        res.rss_mb = max((rss_mb(p.pid) for p in agents.procs), default=None)
    finally:
        await asyncio.to_thread(agents.stop)
    await stack.check_out(res, len(wires))
    await check_mesh_rows(stack, res, len(wires))
    return res


# ----------------------------------------------------------------------------- 4: FastStream


async def bench_faststream(stack: Stack, wires: Sequence[bytes], *, batch: bool) -> Result:
    label = (
        f"FastStream StreamSub(group, batch=True, max_records={BATCH}), pipelined publish"
        if batch
        else f"FastStream StreamSub(group, max_records={BATCH}), one publish per message"
    )
    res = Result(label, len(wires))
    try:
        from faststream.redis import RedisBroker, StreamSub

        fs_version = metadata.version("faststream")
    except ImportError as exc:
        res.note = f"not measured: faststream not installed ({exc}); pip install -e '.[bench]'"
        return res
    res.name = res.name.replace("FastStream", f"FastStream {fs_version}", 1)

    await stack.reset()
    out_redis = Redis.from_url(stack.cfg.redis_url)
    # logger=None: no log line per message (agentmesh writes none either)
    broker = RedisBroker(stack.cfg.redis_url, logger=None)  # type: ignore[arg-type]
    sub = StreamSub(
        IN_STREAM,
        group=FS_GROUP,
        consumer="fs-1",
        batch=batch,
        max_records=BATCH,
        polling_interval=100,
    )

    def handoff(env: Envelope) -> dict[str, Any]:
        out = Envelope(
            type="bench.out",
            session_id=env.session_id,
            causation_id=env.event_id,
            source="faststream",
            payload={"n": env.payload["n"]},
        )
        return out.model_dump(mode="json")

    if batch:

        @broker.subscriber(stream=sub)  # type: ignore[untyped-decorator]
        async def on_batch(envs: list[Envelope]) -> None:
            pipe = out_redis.pipeline(transaction=False)
            for env in envs:
                await broker.publish(handoff(env), stream=OUT_STREAM, pipeline=pipe)
            await pipe.execute()

    else:

        @broker.subscriber(stream=sub)  # type: ignore[untyped-decorator]
        async def on_one(env: Envelope) -> None:
            await broker.publish(handoff(env), stream=OUT_STREAM)

    try:
        await broker.connect()
        # pre-fill in FastStream's own message format, through its publisher (not timed)
        for i in range(0, len(wires), 1000):
            pipe = out_redis.pipeline(transaction=False)
            for w in wires[i : i + 1000]:
                await broker.publish(json.loads(w), stream=IN_STREAM, pipeline=pipe)
            await pipe.execute()
        # a group at 0, so the pre-filled entries are read (FastStream would create it at $)
        await stack.create_group(IN_STREAM, FS_GROUP)
        t0, c0 = time.monotonic(), time.process_time()
        await broker.start()
        await stack.time_drain(res, t0, IN_STREAM, FS_GROUP)
        res.cpu_s = time.process_time() - c0
    finally:
        with contextlib.suppress(Exception):
            await broker.stop()
        await out_redis.aclose()
    await stack.check_out(res, len(wires))
    return res


# ----------------------------------------------------------------------------- report


def fmt_table(results: Sequence[Result]) -> list[str]:
    base = next((r.rate for r in results if r.key == "raw"), None)
    lines = [
        "| # | variant | messages | seconds | msgs/s | vs raw loop "
        "| 1st / 2nd half msgs/s | CPU us/msg | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(results, 1):
        rate = r.rate
        secs = f"{r.seconds:.2f}" if r.seconds is not None else "-"
        msgs_s = f"{rate:,.0f}" if rate is not None else "not measured"
        ratio = f"{rate / base:.2f}x" if rate is not None and base else "-"
        halves = f"{r.halves[0]:,.0f} / {r.halves[1]:,.0f}" if r.halves else "-"
        notes = "; ".join([r.note, *(f"CHECK FAILED: {c}" for c in r.checks)]).strip("; ")
        cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "-"
        lines.append(
            f"| {i} | {r.name} | {r.messages:,} | {secs} | {msgs_s} | {ratio} | {halves} "
            f"| {cpu} | {notes} |"
        )
    return lines


def render_section(
    results: Sequence[Result],
    info: dict[str, str],
    args: argparse.Namespace,
    n_naive: int,
    elapsed: float,
) -> str:
    n = args.messages
    cmd = f"python bench/runtime_throughput.py --messages {n}"
    if args.naive_messages != NAIVE_DEFAULT:
        cmd += f" --naive-messages {args.naive_messages}"
    if args.repeat > 1:
        cmd += f" --repeat {args.repeat}"
    best = f"best of {args.repeat} runs per row, " if args.repeat > 1 else ""
    day = dt.date.today().isoformat()
    lines = [
        SECTION,
        "",
        f"Measured {day} by `{cmd}` ({best}whole run {elapsed:.0f}s; Redis and PostgreSQL "
        "started by the script on the same machine).",
        "",
        f"- machine: `nproc` = {info['nproc']}"
        + (f", {info['cpu']}" if info["cpu"] else "")
        + f", {info['os']}",
        f"- Python {info['python']}, Redis {info['redis']} (AOF, appendfsync everysec), "
        f"PostgreSQL {info['postgres']} (fsync on, synchronous_commit {info['sync_commit']})",
        f"- redis-py {version('redis')}, asyncpg {version('asyncpg')}, "
        f"pydantic {version('pydantic')}, FastStream {version('faststream')}",
        f"- N = {n:,} messages per run; the one-transaction-per-message row uses "
        f"N = {n_naive:,} to keep the run short (its rate does not depend on N).",
        "",
        *fmt_table(results),
        "",
        "Every row consumes pre-filled `bench.in` envelopes from one Redis stream through a "
        "consumer group and hands one event per message to `bench:out`; the clock runs from "
        "consumer start until the group has no pending entries and no lag. Rows 1-2 are "
        "hand-written redis-py loops (json only, no validation; XADDs and XACK go in one "
        "pipeline). The agentmesh rows run the real `Runner`: envelope + payload validation, "
        "dedup lookup, one Postgres statement per batch (idempotency + action + outbox rows), "
        "deduplicated XADD (Lua) and XACK. The FastStream rows validate the envelope with "
        "pydantic and publish through FastStream (per-message logging off); they write nothing "
        "to Postgres. See `bench/README.md`.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


Step = Callable[[], Awaitable[Result]]


async def run_all(args: argparse.Namespace, cfg: devstack.StackConfig) -> None:
    t_start = time.monotonic()
    await migrate(cfg.postgres_dsn)
    redis = Redis.from_url(cfg.redis_url)
    pg = await asyncpg.connect(cfg.postgres_dsn)
    try:
        await pg.execute(NAIVE_TABLE)
        stack = Stack(cfg, redis, pg)
        n, n_naive = args.messages, min(args.naive_messages, args.messages)
        wires = make_inputs(n)
        naive = wires[:n_naive]
        info = machine_info()
        info["python"] = platform.python_version()
        info["redis"] = _s((await redis.info("server"))["redis_version"])
        info["postgres"] = str(await pg.fetchval("SHOW server_version"))
        info["sync_commit"] = str(await pg.fetchval("SHOW synchronous_commit"))

        steps: list[tuple[str, str, Step]] = [
            ("raw", "raw redis-py loop", lambda: bench_raw(stack, wires, with_pg=False)),
            ("naive", "raw loop + tx per message", lambda: bench_raw(stack, naive, with_pg=True)),
            ("mesh1", "agentmesh consumers=1", lambda: bench_runtime(stack, wires, consumers=1)),
            ("mesh2", "agentmesh consumers=2", lambda: bench_runtime(stack, wires, consumers=2)),
            ("procs1", "agentmesh x1 process", lambda: bench_processes(stack, wires, procs=1)),
            ("procs2", "agentmesh x2 processes", lambda: bench_processes(stack, wires, procs=2)),
            ("fs-batch", "FastStream batch", lambda: bench_faststream(stack, wires, batch=True)),
            ("fs-single", "FastStream", lambda: bench_faststream(stack, wires, batch=False)),
        ]
        best: dict[str, Result] = {}
        for rep in range(args.repeat):
            for key, label, step in steps:
                if key in args.skip:
                    continue
                print(f"... {key}: {label} ({rep + 1}/{args.repeat})", file=sys.stderr, flush=True)
                try:
                    res = await step()
                except Exception as exc:
                    count = n_naive if key == "naive" else n
                    res = Result(label, count, note=f"not measured: {type(exc).__name__}: {exc}")
                    res.note = res.note[:300].replace("|", "/").replace("\n", " ")
                res.key = key
                if res.rate is not None:
                    print(f"    {res.rate:,.0f} msgs/s ({res.seconds:.2f}s)", file=sys.stderr)
                old = best.get(key)
                if old is None or (res.rate or 0) > (old.rate or 0):
                    best[key] = res
        results = list(best.values())
        await stack.reset()
    finally:
        await redis.aclose()
        await pg.close()

    section = render_section(results, info, args, n_naive, time.monotonic() - t_start)
    print()
    print(section)
    if not args.no_write:
        write_section(SECTION, section, DOC)
        print(f"written to {DOC.relative_to(ROOT)}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=20_000, help="messages per run")
    ap.add_argument(
        "--naive-messages",
        type=int,
        default=NAIVE_DEFAULT,
        help="messages for the one-transaction-per-message row (slow; default 4000)",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="run every row this many times, report the best"
    )
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="ROW",
        help="rows to leave out: raw naive mesh1 mesh2 procs2 fs-batch fs-single",
    )
    ap.add_argument("--keep-dir", action="store_true", help="keep the temp dir (server logs)")
    args = ap.parse_args(argv)
    if args.messages < BATCH:
        ap.error(f"--messages must be at least {BATCH}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    configure_logs(level="WARNING")
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))
    # a ./mesh.toml must not change the agentmesh rows (MESH_* variables still do, on purpose)
    os.environ["MESH_CONFIG"] = str(root / "no-mesh.toml")
    cfg = devstack.StackConfig(
        root=root, redis_port=devstack.free_port(), pg_port=devstack.free_port()
    )

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    ok = False
    try:
        print(
            f"starting redis :{cfg.redis_port} and postgres :{cfg.pg_port} in {root}",
            file=sys.stderr,
        )
        devstack.up(cfg, ("redis", "postgres"))
        asyncio.run(run_all(args, cfg))
        ok = True
    finally:
        try:
            devstack.down(cfg, ("redis", "postgres"))
        finally:
            if ok and not args.keep_dir:
                shutil.rmtree(root, ignore_errors=True)
            else:
                print(f"server logs kept in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
