"""`mesh relay run`: one relay in its own process, with health and metrics over HTTP.

Apart from `Relay` because signals, the HTTP server and waiting for the servers at start are
the process's concerns; one-shot commands, tests and benchmarks use `Relay` alone.

The relay starts while PostgreSQL or Kafka is down: /healthz answers at once, /readyz says
what it waits for, and it starts publishing when both answer. Waiting for PostgreSQL is
`Waiter` (agentmesh.process.waiting, which also says what counts as a misconfiguration that
ends the process at once); waiting for Kafka is the round loop's own outage handling.
"""

from __future__ import annotations

import asyncio

import structlog

from agentmesh.outbox.relay_loop import Relay
from agentmesh.process.waiting import Waiter, check_kafka_bootstrap
from agentmesh.settings import Settings

log = structlog.get_logger("agentmesh.relay")


async def serve(s: Settings) -> None:
    """`mesh relay run`: one relay process with /healthz, /readyz and /metrics, until SIGTERM
    or SIGINT. In-flight rounds finish (acks awaited, rows marked) before it exits."""
    import signal

    from agentmesh.process.health import HealthServer

    check_kafka_bootstrap(s.kafka_bootstrap)  # Misconfigured: waiting would not help
    relay = Relay(s)
    pg_server, kafka_server = relay.servers
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def live() -> tuple[bool, str]:
        return True, "ok"

    async def ready() -> tuple[bool, str]:
        state = f"slots={len(relay.owned)} relays={relay.relays} kafka_ok={relay.kafka_ok}"
        if stop.is_set():
            waiting: str | None = "stopping"
        elif relay.pool is None:
            waiting = relay.outages.describe() or f"connecting to {pg_server.name}"
        else:
            waiting = relay.outages.describe()
            if waiting is None and not relay.kafka_ok:
                waiting = f"connecting to {kafka_server.name} at {kafka_server.address}"
        return waiting is None, state if waiting is None else f"{waiting} ({state})"

    async def start() -> bool:
        await relay.start()
        return True

    http = HealthServer(
        host=s.http_host, port=s.http_port, metrics=relay.metrics.registry, live=live, ready=ready
    )
    port = await http.start()
    log.info("relay starting", name=relay.name, topic=s.audit_topic, http_port=port)
    try:
        wait = Waiter(stop, log, relay.outages, servers=relay.servers)
        if await wait.until_up(pg_server, start, undo=relay.close):
            await relay.run(stop)
    finally:
        await relay.close()
        await http.stop()
        log.info("relay stopped", name=relay.name)
