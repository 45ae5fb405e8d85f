"""A LOCAL STAND-IN for an external payment gateway, for the demo and the tests only.

Real gateways (Stripe, Adyen) take an ``Idempotency-Key`` header and return the first
answer again for a repeated key; this stand-in does the same, so a payments agent that
retries a call after a crash is proven not to pay twice. Its ledger is a JSON-lines file
so a test can read it after the server (or several of them) stopped.

Faults it can inject: a fixed latency, a failure rate (the refund is *not* paid, 502),
and outage windows in seconds since start (503). Stdlib only: it is not part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class GatewayConfig:
    latency_s: float = 0.0
    failure_rate: float = 0.0
    outages: list[tuple[float, float]] = field(default_factory=list)
    ledger_path: Path | None = None
    seed: int | None = None


@dataclass(kw_only=True)
class Reply:
    status: int
    body: dict[str, Any]


class PaymentGatewayStandIn:
    """Honours idempotency keys: one key pays at most once, whatever the concurrency."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self._random = random.Random(config.seed)
        self._answers: dict[str, tuple[str, Reply]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.ledger: list[dict[str, Any]] = []
        self.calls = 0
        if config.ledger_path is not None and config.ledger_path.exists():
            self._reload(config.ledger_path)

    def _reload(self, path: Path) -> None:
        """A restarted gateway still knows the keys it paid, as a real one does: without this a
        retry after a gateway restart would pay a second time."""
        for entry in read_ledger(path):
            self.ledger.append(entry)
            self._answers[entry["idempotency_key"]] = (entry.get("request", ""), _paid(entry))

    def in_outage(self) -> bool:
        now = time.monotonic() - self.started
        return any(start <= now < end for start, end in self.config.outages)

    async def refund(self, key: str | None, raw: bytes) -> Reply:
        self.calls += 1
        if self.config.latency_s:
            await asyncio.sleep(self.config.latency_s)
        if self.in_outage():
            return Reply(status=503, body={"error": "gateway outage (stand-in window)"})
        if not key:
            return Reply(status=400, body={"error": "Idempotency-Key header is required"})
        try:
            request = json.loads(raw)
            amount = int(request["amount_cents"])
            ticket = str(request["ticket_id"])
        except (ValueError, KeyError, TypeError):
            return Reply(
                status=400, body={"error": "body must be JSON with ticket_id, amount_cents"}
            )
        if amount <= 0:
            return Reply(status=422, body={"error": "amount_cents must be positive"})
        fingerprint = json.dumps(request, sort_keys=True)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key in self._answers:
                seen, reply = self._answers[key]
                if seen != fingerprint:
                    return Reply(
                        status=422, body={"error": "idempotency key reused with another body"}
                    )
                return Reply(status=reply.status, body={**reply.body, "replayed": True})
            if request.get("account") == "closed":  # refused for good, and remembered so
                reply = Reply(status=402, body={"error": "customer account is closed"})
                self._answers[key] = (fingerprint, reply)
                return reply
            if self._random.random() < self.config.failure_rate:
                # Declined before any money moved: not remembered, so a retry may succeed.
                return Reply(status=502, body={"error": "refund declined (stand-in failure rate)"})
            entry = {
                "refund_id": f"rf_{uuid.uuid4().hex[:16]}",
                "idempotency_key": key,
                "ticket_id": ticket,
                "amount_cents": amount,
                "paid_at": time.time(),
                "request": fingerprint,
            }
            self._record(entry)
            reply = _paid(entry)
            self._answers[key] = (fingerprint, reply)
            return reply

    def _record(self, entry: dict[str, Any]) -> None:
        self.ledger.append(entry)
        if self.config.ledger_path is not None:
            with self.config.ledger_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                reply = await self._route(method, path, headers, body)
                payload = json.dumps(reply.body).encode()
                writer.write(
                    f"HTTP/1.1 {reply.status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if method == "POST" and path == "/refunds":
            return await self.refund(headers.get("idempotency-key"), body)
        if method == "GET" and path == "/ledger":
            return Reply(status=200, body={"refunds": self.ledger, "calls": self.calls})
        if method == "POST" and path == "/admin/outage":  # an outage starting now; 0 ends it
            try:
                seconds = float(json.loads(body)["seconds"])
            except (ValueError, KeyError, TypeError):
                return Reply(status=400, body={"error": 'body must be {"seconds": N}'})
            now = time.monotonic() - self.started
            if seconds <= 0:  # the gateway is back: every outage window ends now
                self.config.outages = [(a, min(b, now)) for a, b in self.config.outages]
                return Reply(status=200, body={"outage": None})
            self.config.outages.append((now, now + seconds))
            return Reply(status=200, body={"outage": [now, now + seconds]})
        if method == "GET" and path == "/healthz":
            return Reply(status=200, body={"outage": self.in_outage()})
        return Reply(status=404, body={"error": f"no route {method} {path}"})


def _paid(entry: dict[str, Any]) -> Reply:
    body = {k: v for k, v in entry.items() if k != "request"}
    return Reply(status=201, body={**body, "replayed": False})


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The stand-in's own ledger: one JSON line per refund it paid."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def paid_twice(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Tickets paid more than once in one ledger, with their count (empty: none)."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["ticket_id"]] = counts.get(e["ticket_id"], 0) + 1
    return {ticket: n for ticket, n in counts.items() if n > 1}


async def request_json(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
) -> Reply:
    """A one-shot HTTP/1.1 JSON call (stdlib only), for the payments agent and the tests."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            raw = json.dumps(body).encode() if body is not None else b""
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(raw)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(head.encode() + b"\r\n" + raw)
            await writer.drain()
            status = int((await reader.readline()).split(b" ", 2)[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            return Reply(status=status, body=json.loads(await reader.readexactly(length)))
        finally:
            writer.close()


def _window(text: str) -> tuple[float, float]:
    start, _, end = text.partition("-")
    return float(start), float(end)


def main() -> None:
    parser = argparse.ArgumentParser(description="Payment gateway STAND-IN (demo and tests only).")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per call")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--outage", type=_window, action="append", default=[], help="START-END s")
    parser.add_argument("--ledger", type=Path)
    args = parser.parse_args()
    gateway = PaymentGatewayStandIn(
        GatewayConfig(
            latency_s=args.latency,
            failure_rate=args.failure_rate,
            outages=args.outage,
            ledger_path=args.ledger,
        )
    )

    async def serve() -> None:
        server = await asyncio.start_server(gateway.handle, args.host, args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
