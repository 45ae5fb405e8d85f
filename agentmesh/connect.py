"""Every client of Redis, PostgreSQL and Kafka is built here, from Settings: the URL, the
user and password, and TLS (CA, client certificate) in one place, so no call site can forget
a setting, and a secret passes from Settings to the client library and nowhere else.

- Redis: `redis_client(s)`; `rediss://` is TLS, verified against MESH_REDIS_SSL_CA_FILE (else
  the system's trust store), host name checked; MESH_REDIS_USERNAME/PASSWORD are the ACL user.
- PostgreSQL: `pg_connect(s)`, `pg_pool(s)` (or `postgres_kwargs(s)` for asyncpg itself);
  MESH_POSTGRES_SSLMODE as libpq has it, MESH_POSTGRES_SSLROOTCERT the CA.
- Kafka: `kafka_kwargs(s)` for any aiokafka client: security protocol, SASL PLAIN/SCRAM,
  TLS with the CA (else the system's trust store, which public managed Kafka needs).

A setting that can never work (a CA file that cannot be read, SASL without a user, a CA for
a plain-text connection) raises `Misconfigured` naming it: waiting would not help.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from redis.asyncio import Redis

from agentmesh.process.waiting import Misconfigured, Server
from agentmesh.settings import Settings

_PG_PLAIN_MODES = ("disable", "allow", "prefer")


def _server(kind: str, address: str, setting: str) -> Server:
    return Server(kind, address, setting)


def _tls_context(
    *,
    kind: str,
    address: str,
    cafile: tuple[str, str | None],
    cert: tuple[str, str | None] = ("", None),
    key: str | None = None,
    key_password: str | None = None,
    verify: bool = True,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client TLS context: the CA file (else the system's trust store), the client
    certificate if any. A file that cannot be read names its setting."""
    ca_setting, ca_path = cafile
    try:
        ctx = ssl.create_default_context(cafile=ca_path)
    except (OSError, ssl.SSLError) as exc:
        raise Misconfigured.of(_server(kind, address, ca_setting), _why(ca_path, exc)) from None
    ctx.check_hostname = verify and check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    cert_setting, cert_path = cert
    if cert_path:
        try:
            ctx.load_cert_chain(cert_path, key, password=key_password)
        except (OSError, ssl.SSLError) as exc:
            reason = _why(cert_path, exc)
            raise Misconfigured.of(_server(kind, address, cert_setting), reason) from None
    return ctx


def _why(path: str | None, exc: BaseException) -> str:
    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot use {path}: {what}"[:300]


# -- Redis ---------------------------------------------------------------------------------
def redis_kwargs(s: Settings) -> dict[str, Any]:
    """Keyword arguments of `Redis.from_url(s.redis_url, ...)` beyond the URL."""
    address = Server.redis(s.redis_url).address
    kw: dict[str, Any] = {}
    if s.redis_username:
        kw["username"] = s.redis_username
    if s.redis_password is not None:
        kw["password"] = s.redis_password.get_secret_value()
    tls_files = s.redis_ssl_ca_file or s.redis_ssl_cert_file
    try:
        scheme = urlsplit(s.redis_url).scheme
    except ValueError:
        scheme = ""
    if scheme == "rediss":
        kw.update(ssl_cert_reqs="required", ssl_check_hostname=True)
        if s.redis_ssl_ca_file:
            _readable("Redis", address, "redis_ssl_ca_file", s.redis_ssl_ca_file)
            kw["ssl_ca_certs"] = s.redis_ssl_ca_file
        if s.redis_ssl_cert_file:
            _readable("Redis", address, "redis_ssl_cert_file", s.redis_ssl_cert_file)
            kw.update(ssl_certfile=s.redis_ssl_cert_file, ssl_keyfile=s.redis_ssl_key_file)
    elif tls_files:
        reason = "TLS files are set but the URL is not rediss:// (it would not be used)"
        raise Misconfigured.of(_server("Redis", address, "redis_url"), reason)
    return kw


def redis_client(s: Settings, **options: Any) -> Redis:
    """A Redis client (lazy: it connects on first use) with the settings' auth and TLS."""
    return Redis.from_url(s.redis_url, **redis_kwargs(s), **options)


def _readable(kind: str, address: str, setting: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise Misconfigured.of(_server(kind, address, setting), _why(path, exc)) from None


# -- PostgreSQL ----------------------------------------------------------------------------
def postgres_kwargs(s: Settings, dsn: str | None = None) -> dict[str, Any]:
    """Keyword arguments of `asyncpg.connect` / `asyncpg.create_pool` (dsn included).

    sslmode as libpq: disable/allow/prefer let asyncpg negotiate; require encrypts without
    checking the certificate (unless a root certificate is set: then verify-ca, as libpq
    does); verify-ca checks the chain; verify-full also checks the host name. A root
    certificate without a mode means verify-full. Unset: whatever the DSN says."""
    dsn = dsn or s.postgres_dsn
    kw: dict[str, Any] = {"dsn": dsn}
    if s.postgres_password is not None:
        kw["password"] = s.postgres_password.get_secret_value()
    mode = s.postgres_sslmode
    if mode is None and (s.postgres_sslrootcert or s.postgres_sslcert):
        mode = "verify-full"
    if mode is None:
        return kw
    if mode in _PG_PLAIN_MODES:
        kw["ssl"] = mode
        return kw
    if mode == "require" and s.postgres_sslrootcert:
        mode = "verify-ca"
    kw["ssl"] = _tls_context(
        kind="PostgreSQL",
        address=Server.postgres(dsn).address,
        cafile=("postgres_sslrootcert", s.postgres_sslrootcert),
        cert=("postgres_sslcert", s.postgres_sslcert),
        key=s.postgres_sslkey,
        verify=mode != "require",
        check_hostname=mode == "verify-full",
    )
    return kw


async def pg_connect(s: Settings, *, dsn: str | None = None, **options: Any) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(**postgres_kwargs(s, dsn), **options)
    return conn


async def pg_pool(s: Settings, **options: Any) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(**postgres_kwargs(s), **options)
    return pool


# -- Kafka ---------------------------------------------------------------------------------
def kafka_kwargs(s: Settings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client (producer, consumer, admin) takes:
    `bootstrap_servers`, `security_protocol`, the SASL mechanism and credentials, and an
    `ssl_context` for SSL and SASL_SSL."""
    proto = s.kafka_security_protocol
    kw: dict[str, Any] = {"bootstrap_servers": s.kafka_bootstrap, "security_protocol": proto}
    where = s.kafka_bootstrap
    if proto in ("SSL", "SASL_SSL"):
        key_password = s.kafka_ssl_key_password
        kw["ssl_context"] = _tls_context(
            kind="Kafka",
            address=where,
            cafile=("kafka_ssl_ca_file", s.kafka_ssl_ca_file),
            cert=("kafka_ssl_cert_file", s.kafka_ssl_cert_file),
            key=s.kafka_ssl_key_file,
            key_password=key_password.get_secret_value() if key_password else None,
        )
    elif s.kafka_ssl_ca_file or s.kafka_ssl_cert_file:
        reason = f"TLS files are set but the security protocol is {proto} (they would not be used)"
        raise Misconfigured.of(_server("Kafka", where, "kafka_security_protocol"), reason)
    if proto.startswith("SASL_"):
        if not s.kafka_sasl_username or s.kafka_sasl_password is None:
            reason = f"{proto} needs MESH_KAFKA_SASL_USERNAME and MESH_KAFKA_SASL_PASSWORD"
            raise Misconfigured.of(_server("Kafka", where, "kafka_sasl_username"), reason)
        kw.update(
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=s.kafka_sasl_password.get_secret_value(),
        )
    return kw
