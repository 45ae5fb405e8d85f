"""The payments agent's gateway client (httpx) against the stand-in: https verified against the
configured CA (and refused without it), the base URL's path, the timeout, the idempotency key."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from refund_desk import agents
from refund_desk.events import Ticket
from refund_desk.gateway_client import GatewayClient
from refund_desk.gateway_standin import GatewayConfig, PaymentGatewayStandIn
from tests.conftest import ROOT
from tests.helpers import mesh
from tests.tls_certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("gateway-tls"))


@asynccontextmanager
async def serving(
    config: GatewayConfig, certs: Certs | None = None
) -> AsyncIterator[tuple[PaymentGatewayStandIn, str]]:
    """The stand-in on a free loopback port; https when `certs` are given. Yields its URL."""
    gateway = PaymentGatewayStandIn(config)
    tls = None
    if certs is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(certs.cert, certs.key)
    server = await asyncio.start_server(gateway.handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield gateway, f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


BODY = {"ticket_id": "T-1", "amount_cents": 1200, "account": None}


async def test_https_with_the_configured_ca_pays_and_a_repeat_is_replayed(certs: Certs) -> None:
    async with serving(GatewayConfig(), certs) as (gateway, url):
        async with GatewayClient(url, ca_file=str(certs.ca)) as client:
            first = await client.refund("refund:T-1", BODY)
            again = await client.refund("refund:T-1", BODY)  # the same idempotency key
        assert first.status == again.status == 201
        assert again.body["replayed"] and again.body["refund_id"] == first.body["refund_id"]
        assert [e["idempotency_key"] for e in gateway.ledger] == ["refund:T-1"]


async def test_https_without_the_ca_or_with_another_ca_is_refused_and_pays_nothing(
    certs: Certs,
) -> None:
    async with serving(GatewayConfig(), certs) as (gateway, url):
        for ca in (None, str(certs.other_ca)):  # the system's trust store; an unrelated CA
            async with GatewayClient(url, ca_file=ca) as client:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.refund("refund:T-2", BODY)
        # the certificate names 127.0.0.1 and localhost, not this name: the host is checked
        async with GatewayClient(url.replace("127.0.0.1", "127.0.0.2"), ca_file=str(certs.ca)) as c:
            with pytest.raises(httpx.ConnectError):
                await c.refund("refund:T-2", BODY)
        assert gateway.calls == 0 and gateway.ledger == []


async def test_plain_http_to_an_https_gateway_fails_instead_of_sending_in_clear(
    certs: Certs,
) -> None:
    async with serving(GatewayConfig(), certs) as (gateway, url):
        async with GatewayClient(url.replace("https", "http"), timeout_s=5) as client:
            with pytest.raises(httpx.TransportError):
                await client.refund("refund:T-3", BODY)
        assert gateway.ledger == []


async def test_the_base_urls_path_is_kept() -> None:
    async with serving(GatewayConfig()) as (_, url):
        async with GatewayClient(url + "/v2") as client:
            r = await client.refund("refund:T-4", BODY)
        assert r.status == 404 and r.body["error"] == "no route POST /v2/refunds"
        async with GatewayClient(url + "/") as client:
            assert (await client.refund("refund:T-4", BODY)).status == 201


async def test_a_slow_gateway_times_out() -> None:
    async with serving(GatewayConfig(latency_s=3.0)) as (_, url):
        async with GatewayClient(url, timeout_s=0.2) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.refund("refund:T-5", BODY)


async def test_the_payments_agent_uses_it_the_same_way(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_refund` (the payments handler's call) over https: paid with the CA; without it the
    failure is an outage (retried, breaker), never a refusal (which would compensate)."""
    ticket = Ticket(ticket_id="T-6", customer="c@example.com", order_id="O-6", amount_cents=700)
    async with serving(GatewayConfig(), certs) as (gateway, url):
        monkeypatch.setattr(agents, "GATEWAY_URL", url)
        monkeypatch.setattr(agents.DESK, "gateway_ca_file", None)
        monkeypatch.setattr(agents, "_gateway", None)
        with pytest.raises(agents.GatewayUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await agents._refund("refund:T-6", ticket)
        await agents.gateway().aclose()
        monkeypatch.setattr(agents.DESK, "gateway_ca_file", str(certs.ca))
        monkeypatch.setattr(agents, "_gateway", None)
        try:
            paid = await agents._refund("refund:T-6", ticket)
        finally:
            await agents.gateway().aclose()
        assert paid["refund_id"] == gateway.ledger[0]["refund_id"]
        assert gateway.ledger[0]["idempotency_key"] == "refund:T-6"


def test_a_gateway_ca_file_that_is_not_there_stops_the_agent_at_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        PYTHONPATH=os.pathsep.join((str(ROOT), str(ROOT / "examples"))),
        MESH_AGENTS_MODULE="refund_desk",
        REFUND_GATEWAY_CA_FILE=str(tmp_path / "missing-ca.pem"),
    )
    r = mesh(env, "agent", "run", "payments", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "invalid setting gateway_ca_file" in r.stderr and "Traceback" not in r.stderr
