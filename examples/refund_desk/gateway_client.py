"""The payments agent's HTTP client for the payment gateway, on httpx.

It talks to a real gateway exactly as to the stand-in: the base URL's scheme, host, port and
path are all honoured (`https://pay.example/v2` posts to `/v2/refunds`), https verifies the
certificate (against `ca_file` when given, else the system's trust store) and its host name,
every call has a timeout, and a refund carries its `Idempotency-Key`. The admin calls
(`outage`, `ledger`) exist only on the stand-in and send its bearer token.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx

from refund_desk.gateway_standin import Reply

#: Connect, read, write and pool timeouts (seconds) of one call, unless told otherwise.
DEFAULT_TIMEOUT_S = 5.0


def tls_verify(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name checked; `ca_file` is the CA that signed the gateway's
    certificate (a private CA, a self-signed one in tests), else the system's trust store."""
    return ssl.create_default_context(cafile=ca_file)


class GatewayClient:
    """One connection pool to one gateway. Use `async with` or call `aclose()`."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        admin_token: str | None = None,
    ) -> None:
        self.base_url = base_url
        self._admin_token = admin_token
        self._http = httpx.AsyncClient(
            base_url=base_url,
            verify=tls_verify(ca_file),
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,  # a redirected refund would be a second request elsewhere
            trust_env=False,  # no proxy or CA bundle picked up from the environment by surprise
        )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def refund(self, idempotency_key: str, body: dict[str, Any]) -> Reply:
        """POST {base}/refunds. Raises httpx.TransportError (connect, TLS, timeout)."""
        headers = {"Idempotency-Key": idempotency_key}
        return await self.call("POST", "refunds", body=body, headers=headers)

    async def outage(self, seconds: float) -> Reply:
        """The stand-in's POST /admin/outage: an outage starting now (0 ends it)."""
        return await self.call("POST", "admin/outage", body={"seconds": seconds}, admin=True)

    async def ledger(self) -> Reply:
        """The stand-in's GET /ledger: what it paid, and how many calls it had."""
        return await self.call("GET", "ledger", admin=True)

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        admin: bool = False,
    ) -> Reply:
        """`path` is relative to the base URL's path. The reply's body is its JSON object, or
        {"error": the first 200 characters} when it is not one."""
        sent = dict(headers or {})
        if admin and self._admin_token:
            sent["Authorization"] = f"Bearer {self._admin_token}"
        r = await self._http.request(method, path.lstrip("/"), json=body, headers=sent)
        return Reply(status=r.status_code, body=_json_object(r.text))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"error": text[:200]}
    return value if isinstance(value, dict) else {"error": text[:200]}


async def request_json(
    base_url: str,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    admin_token: str | None = None,
    ca_file: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Reply:
    """One call on a client of its own (tests, the demo driver)."""
    async with GatewayClient(
        base_url, ca_file=ca_file, timeout_s=timeout_s, admin_token=admin_token
    ) as client:
        return await client.call(
            method, path, body=body, headers=headers, admin=admin_token is not None
        )
