"""`mesh projection run NAME` as a process: the runner, /healthz /readyz /metrics, waiting for
the servers at start (as relays do), and SIGTERM (the batch in flight commits or rolls back
first)."""

from __future__ import annotations

import asyncio
import signal

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from agentmesh.outbox.projection import Projection
from agentmesh.outbox.projection_runner import FoldResult, ProjectionRunner
from agentmesh.process.build_info import register_process_metrics
from agentmesh.process.health import HealthServer
from agentmesh.process.waiting import (
    Outages,
    Server,
    Waiter,
    check_kafka_bootstrap,
    sleep_or_stop,
)
from agentmesh.settings import Settings

log = structlog.get_logger("agentmesh.projection")


class _Metrics:
    """The runner's counts, mirrored every second."""

    def __init__(self, name: str) -> None:
        self.registry = CollectorRegistry()
        r, by = self.registry, ["projection"]
        self._folded = Counter("mesh_projection_folded", "events folded", by, registry=r)
        self._dups = Counter("mesh_projection_duplicates", "duplicate copies skipped", by,
                             registry=r)  # fmt: skip
        self._refused = Counter("mesh_projection_refused", "records refused, each alone", by,
                                registry=r)  # fmt: skip
        self._owned = Gauge("mesh_projection_partitions_owned", "partitions this runner folds",
                            by, registry=r)  # fmt: skip
        register_process_metrics(r, "projection")
        self.name = name
        self._seen = FoldResult(generation=0)

    def update(self, runner: ProjectionRunner) -> None:
        st = runner.stats
        self._folded.labels(self.name).inc(st.folded - self._seen.folded)
        self._dups.labels(self.name).inc(st.duplicates - self._seen.duplicates)
        self._refused.labels(self.name).inc(st.skipped - self._seen.skipped)
        self._seen = FoldResult(0, st.records, st.folded, st.duplicates, st.skipped)
        self._owned.labels(self.name).set(len(runner.owned))


async def serve(s: Settings, p: Projection) -> None:
    """Run one projection runner until SIGTERM or SIGINT."""
    check_kafka_bootstrap(s.kafka_bootstrap)  # Misconfigured: waiting would not help
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = ProjectionRunner(s, p)
    metrics = _Metrics(p.name)
    outages = Outages()
    pg = Server.postgres(s.postgres_dsn)
    started = False

    async def live() -> tuple[bool, str]:
        return True, "ok"

    async def ready() -> tuple[bool, str]:
        state = f"partitions={sorted(runner.owned)} runners={runner.runners}"
        waiting = "stopping" if stop.is_set() else outages.describe()
        if waiting is None and not started:
            waiting = "starting"
        return waiting is None, state if waiting is None else f"{waiting} ({state})"

    async def start() -> bool:
        nonlocal started
        await runner.start()
        started = True
        return True

    http = HealthServer(host=s.http_host, port=s.http_port, metrics=metrics.registry,
                        live=live, ready=ready)  # fmt: skip
    port = await http.start()
    log.info("projection starting", projection=p.name, topic=s.audit_topic, http_port=port)

    async def mirror() -> None:
        while not stop.is_set():
            metrics.update(runner)
            await sleep_or_stop(stop, 1.0)

    mirroring = asyncio.create_task(mirror())
    try:
        wait = Waiter(stop, log, outages, servers=(pg, Server.kafka(s.kafka_bootstrap)))
        if await wait.until_up(pg, start, undo=runner.close):
            await runner.run(stop)
    finally:
        mirroring.cancel()
        await runner.close()
        await http.stop()
        log.info("projection stopped", projection=p.name, folded=runner.stats.folded,
                 duplicates=runner.stats.duplicates, refused=runner.stats.skipped)  # fmt: skip
