"""The payment gateway stand-in, over real loopback HTTP: one idempotency key pays once; it
binds loopback unless told otherwise, bounds the body, and guards /admin/* and /ledger."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from agentmesh import devstack
from refund_desk.gateway_client import request_json
from refund_desk.gateway_standin import (
    GatewayConfig,
    PaymentGatewayStandIn,
    Reply,
    paid_twice,
    read_ledger,
)
from tests.conftest import ROOT

TOKEN = "admin-token-for-tests"


@asynccontextmanager
async def running(config: GatewayConfig) -> AsyncIterator[tuple[PaymentGatewayStandIn, int]]:
    gateway = PaymentGatewayStandIn(config)
    server = await asyncio.start_server(gateway.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield gateway, port
    finally:
        server.close()
        await server.wait_closed()


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


async def refund(port: int, key: str | None, amount: int = 500) -> Reply:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"ticket_id": "T-1", "amount_cents": amount}
    return await request_json(url(port), "POST", "/refunds", body=body, headers=headers)


async def raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (what a hostile client would), read the status line and the rest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        status = int((await reader.readline()).split(b" ", 2)[1])
        return status, await reader.read()
    finally:
        writer.close()


async def test_concurrent_calls_with_one_key_pay_once(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    async with running(GatewayConfig(latency_s=0.05, ledger_path=ledger)) as (gateway, port):
        replies = await asyncio.gather(*(refund(port, "k-1") for _ in range(20)))
        assert sorted(r.status for r in replies) == [201] * 20
        assert len({r.body["refund_id"] for r in replies}) == 1
        assert [r.body["replayed"] for r in replies].count(False) == 1
        assert gateway.calls == 20
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [e["idempotency_key"] for e in lines] == ["k-1"]


async def test_outage_window_answers_503_then_recovers() -> None:
    async with running(GatewayConfig(outages=[(0.0, 0.4)])) as (gateway, port):
        assert (await refund(port, "k-2")).status == 503
        await asyncio.sleep(0.5)
        assert (await refund(port, "k-2")).status == 201
        assert len(gateway.ledger) == 1


async def test_a_declined_refund_is_not_paid_and_may_be_retried() -> None:
    async with running(GatewayConfig(failure_rate=1.0)) as (gateway, port):
        assert (await refund(port, "k-3")).status == 502
        assert gateway.ledger == []
        gateway.config.failure_rate = 0.0
        assert (await refund(port, "k-3")).status == 201
        assert len(gateway.ledger) == 1


async def test_bad_requests_get_clear_errors_and_pay_nothing() -> None:
    async with running(GatewayConfig(admin_token=TOKEN)) as (gateway, port):
        missing = await refund(port, None)
        assert missing.status == 400 and "Idempotency-Key" in missing.body["error"]
        assert (await refund(port, "k-4", amount=-5)).status == 422
        assert (await refund(port, "k-5", amount=100)).status == 201
        reused = await refund(port, "k-5", amount=999)
        assert reused.status == 422 and "another body" in reused.body["error"]
        listed = await request_json(url(port), "GET", "/ledger", admin_token=TOKEN)
        assert [e["amount_cents"] for e in listed.body["refunds"]] == [100]
        assert (await request_json(url(port), "GET", "/nope")).status == 404
        assert len(gateway.ledger) == 1


async def test_a_restarted_gateway_still_knows_the_keys_it_paid(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    async with running(GatewayConfig(ledger_path=ledger)) as (_, port):
        first = await refund(port, "k-1")
    async with running(GatewayConfig(ledger_path=ledger)) as (gateway, port):
        again = await refund(port, "k-1")
        other_body = await refund(port, "k-1", amount=900)
    assert first.status == again.status == 201
    assert again.body["replayed"] and again.body["refund_id"] == first.body["refund_id"]
    assert other_body.status == 422  # the reloaded key still guards its body
    assert len(read_ledger(ledger)) == 1 and paid_twice(read_ledger(ledger)) == {}
    assert len(gateway.ledger) == 1


# -- an open door no more --------------------------------------------------------------------
async def test_admin_endpoints_and_the_ledger_need_the_token() -> None:
    async with running(GatewayConfig(admin_token=TOKEN)) as (gateway, port):
        assert (await refund(port, "k-9")).status == 201  # refunds need no admin token
        for method, path, body in (
            ("GET", "/ledger", None),
            ("POST", "/admin/outage", {"seconds": 60}),
        ):
            nothing = await request_json(url(port), method, path, body=body)
            wrong = await request_json(url(port), method, path, body=body, admin_token="guess")
            assert (nothing.status, wrong.status) == (401, 401), (path, nothing, wrong)
            assert "refunds" not in nothing.body and "refunds" not in wrong.body
        assert not gateway.in_outage()  # the refused outage did not start
        basic = {"Authorization": f"Basic {TOKEN}"}  # the token under another scheme
        assert (await request_json(url(port), "GET", "/ledger", headers=basic)).status == 401
        ok = await request_json(url(port), "GET", "/ledger", admin_token=TOKEN)
        assert ok.status == 200 and len(ok.body["refunds"]) == 1
        down = await request_json(url(port), "POST", "/admin/outage", body={"seconds": 60},
                                  admin_token=TOKEN)  # fmt: skip
        assert down.status == 200 and gateway.in_outage()


async def test_without_a_configured_token_the_admin_endpoints_are_closed() -> None:
    async with running(GatewayConfig()) as (gateway, port):
        for token in (None, "", "anything"):
            r = await request_json(url(port), "GET", "/ledger", admin_token=token)
            assert r.status == 403 and "GATEWAY_ADMIN_TOKEN" in r.body["error"]
        outage = {"Authorization": "Bearer"}  # an empty token is no token
        r = await request_json(url(port), "POST", "/admin/outage", body={"seconds": 9},
                               headers=outage)  # fmt: skip
        assert r.status == 403 and not gateway.in_outage()


async def test_a_body_over_the_limit_is_refused_unread() -> None:
    async with running(GatewayConfig(max_body_bytes=1024)) as (gateway, port):
        # 10 MB announced, none sent: the answer comes at once, so nothing was waited for
        head = b"POST /refunds HTTP/1.1\r\nIdempotency-Key: k\r\nContent-Length: 10000000\r\n\r\n"
        status, rest = await raw(port, head)
        assert status == 413 and b"1024" in rest
        chunked = b"POST /refunds HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert (await raw(port, chunked))[0] == 411
        bad = b"POST /refunds HTTP/1.1\r\nContent-Length: -1\r\n\r\n"
        assert (await raw(port, bad))[0] == 400
        many = b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"
        assert (await raw(port, many))[0] == 431
        assert gateway.calls == 0
        body = {"ticket_id": "T-1", "amount_cents": 5, "text": "x" * 900}  # under the limit
        small = await request_json(url(port), "POST", "/refunds", body=body,
                                   headers={"Idempotency-Key": "k-small"})  # fmt: skip
        assert small.status == 201


@contextmanager
def standin(tmp: Path, *args: str, **env: str) -> Iterator[int]:
    """The stand-in as its own process (python -m refund_desk.gateway_standin)."""
    port = devstack.free_port()
    log = tmp / f"standin-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "refund_desk.gateway_standin", "--port", str(port), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT / "examples"), **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not devstack.tcp_open("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def listening_on(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, _, hexport = local.partition(":")
        if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


async def test_the_process_binds_loopback_unless_told_and_reads_its_token_from_a_file(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    with standin(tmp_path, GATEWAY_ADMIN_TOKEN_FILE=str(token_file)) as port:
        assert listening_on(port) == {"127.0.0.1"}
        ok = await request_json(url(port), "GET", "/ledger", admin_token="from-a-file")
        assert ok.status == 200
        assert (await request_json(url(port), "GET", "/ledger")).status == 401
    with standin(tmp_path, GATEWAY_HOST="0.0.0.0", GATEWAY_ADMIN_TOKEN="t0ken") as port:
        assert listening_on(port) == {"0.0.0.0"}
        assert (await request_json(url(port), "GET", "/ledger", admin_token="t0ken")).status == 200
