"""`make bench`: every figure of issue 13's table in one run, against the same servers.

    python bench/targets.py [--messages N] [--hops M] [--relay-rows R] [--repeat K] [--no-write]

Starts Redis, PostgreSQL and the Kafka-protocol broker once (agentmesh.devstack, free
loopback ports, a temp dir) and measures, one after the other on those servers:

- throughput (bench/runtime_throughput.py): the raw redis-py loop, one and two
  `mesh agent run` processes, the FastStream batch subscriber; the agent's RSS after N
  messages (N = 20,000 by default);
- latency (bench/latency.py), one message at a time: a raw hop next to an agent hop, and a
  chain of four trivial agents;
- the relay (bench/audit_log.py): one `mesh relay run` process next to one raw aiokafka
  producer (acks=all) sending the same records.

Prints the targets table (each met or not) and replaces the section "Targets (make bench)"
of docs/benchmarks.md (`--no-write` leaves the file alone). Best of `--repeat` runs for the
throughput rows; latency and relay rows run once. The servers are stopped at the end, also on
error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import asyncpg  # noqa: E402
import audit_log  # noqa: E402
import latency  # noqa: E402
import runtime_throughput as rt  # noqa: E402
from _report import machine_info, version, write_section  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from agentmesh import devstack  # noqa: E402
from agentmesh.outbox.migrate import migrate  # noqa: E402
from agentmesh.process.logs import configure as configure_logs  # noqa: E402
from agentmesh.settings import Settings  # noqa: E402

SECTION = "## Targets (make bench)"
DOC = ROOT / "docs" / "benchmarks.md"

#: Every figure this script must produce (the smoke test checks the output names them all).
FIGURES = (
    "one process / FastStream batch",
    "one process / raw loop",
    "two processes / raw loop",
    "one hop p50 / raw hop p50",
    "4-hop chain p50 / p99",
    "one relay / raw aiokafka producer",
    "agent RSS after N messages",
)


@dataclass
class Figure:
    name: str
    value: float | None  # the ratio, the ms or the MB; None: not measured
    shown: str  # how it reads in the table
    target: str
    met: bool | None
    detail: str = ""


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: float | None, suffix: str = "x", digits: int = 2) -> str:
    return "not measured" if v is None else f"{v:.{digits}f}{suffix}"


def figures(
    tp: dict[str, rt.Result],
    lat: dict[str, latency.Latency],
    relay: dict[str, audit_log.Result],
    n: int,
) -> list[Figure]:
    def rate(key: str) -> float | None:
        r = tp.get(key)
        return r.rate if r else None

    raw, p1, p2, fs = rate("raw"), rate("procs1"), rate("procs2"), rate("fs-batch")

    def cpu(a: str, b: str) -> str:
        """CPU us per message of two rows: what their rates would be on idle cores."""
        ca, cb = (tp[k].cpu_us if k in tp else None for k in (a, b))
        return f"; CPU {_fmt(ca, '', 0)} vs {_fmt(cb, '', 0)} us/msg"

    out: list[Figure] = []
    r = _ratio(p1, fs)
    out.append(
        Figure(
            FIGURES[0],
            r,
            _fmt(r),
            ">= 1.2x",
            None if r is None else r >= 1.2,
            f"{_fmt(p1, ' msgs/s', 0)} vs {_fmt(fs, ' msgs/s', 0)}" + cpu("procs1", "fs-batch"),
        )
    )
    r = _ratio(p1, raw)
    out.append(
        Figure(
            FIGURES[1],
            r,
            _fmt(r),
            ">= 0.5x",
            None if r is None else r >= 0.5,
            f"{_fmt(p1, ' msgs/s', 0)} vs {_fmt(raw, ' msgs/s', 0)}" + cpu("procs1", "raw"),
        )
    )
    r = _ratio(p2, raw)
    out.append(
        Figure(
            FIGURES[2],
            r,
            _fmt(r),
            ">= 0.8x",
            None if r is None else r >= 0.8,
            f"{_fmt(p2, ' msgs/s', 0)} vs {_fmt(raw, ' msgs/s', 0)}",
        )
    )
    hop, raw_hop = lat.get("mesh-hop"), lat.get("raw-hop")
    h50 = hop.ms(0.5) if hop else None
    r50 = raw_hop.ms(0.5) if raw_hop else None
    r = _ratio(h50, r50)
    out.append(
        Figure(
            FIGURES[3],
            r,
            _fmt(r),
            "<= 2x",
            None if r is None else r <= 2.0,
            f"{_fmt(h50, ' ms')} vs {_fmt(r50, ' ms')}",
        )
    )
    chain = lat.get("chain")
    c50 = chain.ms(0.5) if chain else None
    c99 = chain.ms(0.99) if chain else None
    met = None if c50 is None or c99 is None else c50 <= 8 and c99 <= 20
    out.append(
        Figure(
            FIGURES[4],
            c50,
            f"{_fmt(c50, ' ms', 1)} / {_fmt(c99, ' ms', 1)}",
            "<= 8 ms / <= 20 ms",
            met,
            f"{len(chain.samples) if chain else 0} messages, one at a time",
        )
    )
    rr, rw = relay.get("proc1"), relay.get("raw1")
    r = _ratio(rr.rate if rr else None, rw.rate if rw else None)
    out.append(
        Figure(
            FIGURES[5],
            r,
            _fmt(r),
            ">= 0.75x",
            None if r is None else r >= 0.75,
            f"{_fmt(rr.rate if rr else None, ' records/s', 0)} vs "
            f"{_fmt(rw.rate if rw else None, ' records/s', 0)}",
        )
    )
    rss = tp["procs1"].rss_mb if "procs1" in tp else None
    out.append(
        Figure(
            FIGURES[6].replace("N", f"{n:,}"),
            rss,
            _fmt(rss, " MB", 0),
            "<= 80 MB",
            None if rss is None else rss <= 80,
            "VmRSS of the one-process row, drained",
        )
    )
    return out


def _met(m: bool | None) -> str:
    return "not measured" if m is None else ("met" if m else "NOT met")


def render(
    figs: Sequence[Figure],
    tp: Sequence[rt.Result],
    lat: Sequence[latency.Latency],
    relay: Sequence[audit_log.Result],
    info: dict[str, str],
    cmd: str,
    elapsed: float,
) -> str:
    lines = [
        SECTION,
        "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `{cmd}` (whole run "
        f"{elapsed:.0f}s; Redis, PostgreSQL and the broker started by the script on this "
        "machine, shared by every row).",
        "",
        f"- machine: `nproc` = {info['nproc']}"
        + (f", {info['cpu']}" if info.get("cpu") else "")
        + f", {info['os']}",
        f"- Python {platform.python_version()}, Redis {info['redis']}, PostgreSQL "
        f"{info['postgres']} (fsync on, synchronous_commit {info['sync_commit']}), "
        f"Tansu {info.get('tansu', '?')} on s3rver {info.get('s3rver', '?')}",
        f"- redis-py {version('redis')} (hiredis {version('hiredis')}), asyncpg "
        f"{version('asyncpg')}, pydantic {version('pydantic')}, "
        f"aiokafka {version('aiokafka')}, FastStream {version('faststream')}",
        "",
        "| figure | measured | target | | from |",
        "|---|---:|---|---|---|",
    ]
    for f in figs:
        lines.append(f"| {f.name} | {f.shown} | {f.target} | {_met(f.met)} | {f.detail} |")
    lines += ["", "Throughput rows (best of the repeats):", "", *rt.fmt_table(tp), ""]
    lines += [
        "Latency, one message at a time (ms from the driver's XADD to the output's arrival):",
        "",
        "| variant | messages | p50 | p90 | p99 | max | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for x in lat:
        mx = max(x.samples) * 1000 if x.samples else None
        notes = "; ".join([x.note, *(f"CHECK FAILED: {c}" for c in x.checks)]).strip("; ")
        lines.append(
            f"| {x.name} | {len(x.samples)} | {_fmt(x.ms(0.5), '', 2)} | {_fmt(x.ms(0.9), '', 2)}"
            f" | {_fmt(x.ms(0.99), '', 2)} | {_fmt(mx, '', 2)} | {notes} |"
        )
    lines += ["", "Relay vs raw producer (same records, acks=all):", ""]
    lines += [*audit_log.fmt_relay_table(list(relay)), ""]
    lines += [
        "All rows share the machine's cores with the servers (and with anything else running):"
        " compare ratios within one run. See bench/README.md for what each row does.",
        "",
    ]
    return "\n".join(lines)


Step = Callable[[], Awaitable[object]]


async def run_all(args: argparse.Namespace, cfg: devstack.StackConfig) -> str:
    t_start = time.monotonic()
    await migrate(cfg.postgres_dsn)
    redis = Redis.from_url(cfg.redis_url)
    pg = await asyncpg.connect(cfg.postgres_dsn)
    tp: dict[str, rt.Result] = {}
    lat: dict[str, latency.Latency] = {}
    relay: dict[str, audit_log.Result] = {}
    try:
        await pg.execute(rt.NAIVE_TABLE)
        stack = rt.Stack(cfg, redis, pg)
        info = audit_log.broker_info() | machine_info()
        info["redis"] = rt._s((await redis.info("server"))["redis_version"])
        info["postgres"] = str(await pg.fetchval("SHOW server_version")).split()[0]
        info["sync_commit"] = str(await pg.fetchval("SHOW synchronous_commit"))
        wires = rt.make_inputs(args.messages)

        # ------------------------------------------------------------------ throughput
        steps: list[tuple[str, Callable[[], Awaitable[rt.Result]]]] = [
            ("raw", lambda: rt.bench_raw(stack, wires, with_pg=False)),
            ("procs1", lambda: rt.bench_processes(stack, wires, procs=1)),
            ("procs2", lambda: rt.bench_processes(stack, wires, procs=2)),
            ("fs-batch", lambda: rt.bench_faststream(stack, wires, batch=True)),
        ]
        for rep in range(args.repeat):
            for key, step in steps:
                if key in args.skip:
                    continue
                _say(f"... {key} ({rep + 1}/{args.repeat})")
                try:
                    res = await step()
                except Exception as exc:
                    res = rt.Result(key, args.messages, note=_failed(exc))
                res.key = key
                _say(
                    f"    {_fmt(res.rate, ' msgs/s', 0)}, {_fmt(res.cpu_us, ' CPU us/msg', 0)} "
                    f"{res.note} {res.checks or ''}"
                )
                old = tp.get(key)
                if old is None or (res.rate or 0) > (old.rate or 0):
                    tp[key] = res

        # ------------------------------------------------------------------ latency
        hop_wires = rt.make_inputs(args.hops + args.warmup)
        chain_wires = latency.chain_inputs(args.hops + args.warmup)
        lat_steps: list[tuple[str, Callable[[], Awaitable[latency.Latency]]]] = [
            ("raw-hop", lambda: latency.bench_raw_hop(stack, hop_wires, args.warmup)),
            ("mesh-hop", lambda: latency.bench_mesh_hop(stack, hop_wires, args.warmup)),
            ("chain", lambda: latency.bench_chain(stack, chain_wires, args.warmup)),
        ]
        for key, lstep in lat_steps:
            if key in args.skip:
                continue
            _say(f"... {key}")
            try:
                lres = await lstep()
            except Exception as exc:
                lres = latency.Latency(key, key, note=_failed(exc))
            _say(
                f"    p50 {_fmt(lres.ms(0.5), ' ms')} p99 {_fmt(lres.ms(0.99), ' ms')} {lres.note}"
            )
            lat[key] = lres

        # ------------------------------------------------------------------ relay
        relay = await relay_rows(args, cfg, pg)
        await stack.reset()
    finally:
        await redis.aclose()
        await pg.close()

    figs = figures(tp, lat, relay, args.messages)
    cmd = "make bench" if args.make else "python bench/targets.py " + " ".join(args.argv)
    section = render(
        figs,
        list(tp.values()),
        list(lat.values()),
        list(relay.values()),
        info,
        cmd.strip(),
        time.monotonic() - t_start,
    )
    return section


async def relay_rows(
    args: argparse.Namespace, cfg: devstack.StackConfig, pg: asyncpg.Connection
) -> dict[str, audit_log.Result]:
    """audit_log.py's rows raw1 and proc1 with the same records, on this run's servers."""
    ns = argparse.Namespace(partitions=12, relay_batch=Settings().relay_batch_size)
    n_sessions = max(1, args.relay_rows // 100)
    envs = [
        audit_log.make_event(f"sess-{i % n_sessions:05d}", i // n_sessions)
        for i in range(args.relay_rows)
    ]
    records = [audit_log.record_of(e) for e in envs]
    stamp = int(time.time())
    out: dict[str, audit_log.Result] = {}
    for key, make in (
        ("raw1", lambda t: audit_log.bench_raw(cfg, ns, records, t, 1)),
        ("proc1", lambda t: audit_log.bench_relay_procs(cfg, ns, pg, envs, n_sessions, t, 1)),
    ):
        if key in args.skip:
            continue
        _say(f"... relay {key}")
        try:
            res = await make(f"bench.targets.{key}.{stamp}")
        except Exception as exc:
            res = audit_log.Result(key, key, "-", args.relay_rows, note=_failed(exc))
        _say(f"    {_fmt(res.rate, ' records/s', 0)} {res.note} {res.checks or ''}")
        out[key] = res
    return out


def _failed(exc: BaseException) -> str:
    note = f"not measured: {type(exc).__name__}: {exc}"
    return note[:300].replace("|", "/").replace("\n", " ")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=20_000, help="messages per throughput row")
    ap.add_argument("--hops", type=int, default=500, help="messages per latency row")
    ap.add_argument("--warmup", type=int, default=20, help="latency messages not counted")
    ap.add_argument("--relay-rows", type=int, default=20_000, help="records for the relay rows")
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs per row (best kept)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="ROW",
        help="rows to leave out: raw procs1 procs2 fs-batch raw-hop mesh-hop chain raw1 proc1",
    )
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)  # name the command
    ap.add_argument("--keep-dir", action="store_true", help="keep the temp dir (server logs)")
    args = ap.parse_args(argv)
    args.argv = [a for a in argv if a != "--make"]
    if args.messages < rt.BATCH:
        ap.error(f"--messages must be at least {rt.BATCH}")
    if args.hops < 2 or args.relay_rows < 100 or args.repeat < 1:
        ap.error("--hops >= 2, --relay-rows >= 100 and --repeat >= 1, please")

    configure_logs(level="WARNING")
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-targets-"))
    os.environ["MESH_CONFIG"] = str(root / "no-mesh.toml")  # a ./mesh.toml must not apply
    redis_port, pg_port, kafka_port, s3_port = devstack.free_ports(4)
    cfg = devstack.StackConfig(
        root=root, redis_port=redis_port, pg_port=pg_port, kafka_port=kafka_port, s3_port=s3_port
    )

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    services = ("redis", "postgres", "kafka")
    ok = False
    try:
        _say(f"starting redis, postgres, tansu + s3rver in {root}")
        devstack.up(cfg, services)
        section = asyncio.run(run_all(args, cfg))
        ok = True
    finally:
        try:
            devstack.down(cfg, services)
        finally:
            if ok and not args.keep_dir:
                shutil.rmtree(root, ignore_errors=True)
            else:
                _say(f"server logs kept in {root}")
    print()
    print(section)
    if not args.no_write:
        write_section(SECTION, section, DOC)
        print(f"written to {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
