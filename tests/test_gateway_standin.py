"""The payment gateway stand-in, over real loopback HTTP: one idempotency key pays once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from refund_desk.gateway_standin import (
    GatewayConfig,
    PaymentGatewayStandIn,
    Reply,
    paid_twice,
    read_ledger,
    request_json,
)


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


async def refund(port: int, key: str | None, amount: int = 500) -> Reply:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"ticket_id": "T-1", "amount_cents": amount}
    return await request_json("127.0.0.1", port, "POST", "/refunds", body=body, headers=headers)


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
    async with running(GatewayConfig()) as (gateway, port):
        missing = await refund(port, None)
        assert missing.status == 400 and "Idempotency-Key" in missing.body["error"]
        assert (await refund(port, "k-4", amount=-5)).status == 422
        assert (await refund(port, "k-5", amount=100)).status == 201
        reused = await refund(port, "k-5", amount=999)
        assert reused.status == 422 and "another body" in reused.body["error"]
        listed = await request_json("127.0.0.1", port, "GET", "/ledger")
        assert [e["amount_cents"] for e in listed.body["refunds"]] == [100]
        assert (await request_json("127.0.0.1", port, "GET", "/nope")).status == 404
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
