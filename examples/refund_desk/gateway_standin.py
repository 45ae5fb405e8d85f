"""A LOCAL STAND-IN for an external payment gateway, for the demo and the tests only.

Real gateways (Stripe, Adyen) take an ``Idempotency-Key`` header and return the first
answer again for a repeated key; this stand-in does the same, so a payments agent that
retries a call after a crash is proven not to pay twice. Its ledger is a JSON-lines file
so a test can read it after the server (or several of them) stopped.

Faults it can inject: a fixed latency, a failure rate (the refund is *not* paid, 502),
and outage windows in seconds since start (503). Stdlib only: it is not part of the product.

Even a stand-in must not be an open door: it listens on 127.0.0.1 unless told otherwise
(`--host` or GATEWAY_HOST), refuses a body over `--max-body` bytes (413) without reading
it, and `/admin/*` and `/ledger` need `Authorization: Bearer <token>`, the token from
GATEWAY_ADMIN_TOKEN or the file GATEWAY_ADMIN_TOKEN_FILE (without one they answer 403).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import random
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Largest request body read (a refund is ~100 bytes); more is answered 413 unread.
MAX_BODY_BYTES = 64 * 1024
#: Most header lines one request may have (431 beyond: the stand-in does not buffer more).
MAX_HEADERS = 100
#: Paths that need the admin token.
ADMIN_PATHS = ("/admin/", "/ledger")


@dataclass(kw_only=True)
class GatewayConfig:
    latency_s: float = 0.0
    failure_rate: float = 0.0
    outages: list[tuple[float, float]] = field(default_factory=list)
    ledger_path: Path | None = None
    seed: int | None = None
    admin_token: str | None = None  # None: the admin endpoints and /ledger are closed
    max_body_bytes: int = MAX_BODY_BYTES


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
                lines = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    lines += 1
                    if lines > MAX_HEADERS:
                        await _answer(writer, Reply(status=431, body={"error": "too many headers"}))
                        return
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                early = self._refuse_early(headers)
                if early is not None:  # the body is not read: answer, then close
                    await _answer(writer, early)
                    return
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await _answer(writer, await self._route(method, path, headers, body))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return  # ValueError: a malformed line, or one over the reader's 64 KiB limit
        finally:
            writer.close()

    def _refuse_early(self, headers: dict[str, str]) -> Reply | None:
        """A request whose body must not be read: chunked (unbounded), or too large."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Reply(status=411, body={"error": "send Content-Length, not chunked"})
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return Reply(status=400, body={"error": "bad Content-Length"})
        if int(length) > self.config.max_body_bytes:
            limit = self.config.max_body_bytes
            return Reply(status=413, body={"error": f"body over {limit} bytes"})
        return None

    def _authorized(self, headers: dict[str, str]) -> Reply | None:
        """None when the request carries the admin token, else the refusal."""
        token = self.config.admin_token
        if not token:
            reason = "admin endpoints are closed: start with GATEWAY_ADMIN_TOKEN(_FILE)"
            return Reply(status=403, body={"error": reason})
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return Reply(status=401, body={"error": "Authorization: Bearer <admin token> needed"})
        return None

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path.startswith(ADMIN_PATHS) and (refused := self._authorized(headers)) is not None:
            return refused
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


async def _answer(writer: asyncio.StreamWriter, reply: Reply) -> None:
    payload = json.dumps(reply.body).encode()
    writer.write(
        f"HTTP/1.1 {reply.status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()


def admin_token_from_env(env: dict[str, str] | None = None) -> str | None:
    """GATEWAY_ADMIN_TOKEN, or the content of the file GATEWAY_ADMIN_TOKEN_FILE (not both)."""
    env = dict(os.environ) if env is None else env
    token, path = env.get("GATEWAY_ADMIN_TOKEN"), env.get("GATEWAY_ADMIN_TOKEN_FILE")
    if token and path:
        raise SystemExit("set GATEWAY_ADMIN_TOKEN or GATEWAY_ADMIN_TOKEN_FILE, not both")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            reason = f"GATEWAY_ADMIN_TOKEN_FILE: cannot read {path}: {exc.strerror}"
            raise SystemExit(reason) from None
    return token or None


def _window(text: str) -> tuple[float, float]:
    start, _, end = text.partition("-")
    return float(start), float(end)


def main() -> None:
    parser = argparse.ArgumentParser(description="Payment gateway STAND-IN (demo and tests only).")
    host = os.environ.get("GATEWAY_HOST", "127.0.0.1")
    parser.add_argument("--host", default=host, help="GATEWAY_HOST; 0.0.0.0 in a container")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per call")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--outage", type=_window, action="append", default=[], help="START-END s")
    parser.add_argument("--ledger", type=Path)
    parser.add_argument("--max-body", type=int, default=MAX_BODY_BYTES, help="bytes (else 413)")
    parser.add_argument("--tls-cert", help="serve https with this certificate (PEM)")
    parser.add_argument("--tls-key", help="... and this key")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    gateway = PaymentGatewayStandIn(
        GatewayConfig(
            latency_s=args.latency,
            failure_rate=args.failure_rate,
            outages=args.outage,
            ledger_path=args.ledger,
            admin_token=admin_token_from_env(),
            max_body_bytes=args.max_body,
        )
    )

    async def serve() -> None:
        server = await asyncio.start_server(gateway.handle, args.host, args.port, ssl=tls)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
