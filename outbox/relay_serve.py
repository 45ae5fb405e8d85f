"""`mesh relay run`: one relay in its own process, with health and metrics over HTTP.

Apart from `Relay` because signals, the HTTP server and retrying the first Postgres connect
are the process's concerns; one-shot commands, tests and benchmarks use `Relay` alone.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from agentmesh.outbox.relay_loop import Relay, _sleep_or_stop
from agentmesh.settings import Settings

log = structlog.get_logger("agentmesh.relay")


async def serve(s: Settings) -> None:
    """`mesh relay run`: one relay process with /healthz, /readyz and /metrics, until SIGTERM
    or SIGINT. In-flight rounds finish (acks awaited, rows marked) before it exits."""
    import signal

    from agentmesh.process.health import HealthServer

    relay = Relay(s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def live() -> tuple[bool, str]:
        return True, "ok"

    async def ready() -> tuple[bool, str]:
        ok = relay.pool is not None and relay.kafka_ok
        return ok, f"slots={len(relay.owned)} relays={relay.relays} kafka_ok={relay.kafka_ok}"

    http = HealthServer(
        host=s.http_host, port=s.http_port, metrics=relay.metrics.registry, live=live, ready=ready
    )
    port = await http.start()
    log.info("relay starting", name=relay.name, topic=s.audit_topic, http_port=port)
    backoff = 0.0
    try:
        while not stop.is_set():
            try:
                await relay.start()
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                await relay.close()
                backoff = relay._next_backoff(backoff)
                log.warning("relay: postgres unavailable", error=str(exc), retry_in=backoff)
                await _sleep_or_stop(stop, backoff)
        if not stop.is_set():
            await relay.run(stop)
    finally:
        await relay.close()
        await http.stop()
        log.info("relay stopped", name=relay.name)
