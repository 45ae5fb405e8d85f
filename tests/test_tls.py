"""TLS and authentication from settings: a Redis and a PostgreSQL that accept only TLS and a
password (certificates from a CA made here), reached by the Mesh client and by an agent
process through MESH_* settings alone, secrets from MESH_*_FILE; refused without the CA,
with another CA, in plain text, or with a wrong password. Kafka: the settings reach every
aiokafka client (there is no SASL/TLS broker here; docs/security.md has the recipes)."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.exceptions

import refund_desk  # noqa: F401  (registers the refund desk's event types)
from agentmesh import Mesh, Settings, devstack
from agentmesh.connect import kafka_kwargs, pg_connect, redis_client
from agentmesh.outbox import kafka
from agentmesh.outbox.migrate import migrate
from agentmesh.process.waiting import Misconfigured, Server, outage_reason
from tests.conftest import ROOT, MeshProcess, eventually
from tests.tls_certs import Certs, make_certs
from tests.tls_servers import tls_postgres, tls_redis

REDIS_USER = "mesh-agent"
REDIS_PASSWORD = "redis-pw-6c1f0e2a"
PG_PASSWORD = "pg-pw-93d7b5e1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[int]:
    d = tmp_path_factory.mktemp("tls-redis")
    with tls_redis(d, certs, user=REDIS_USER, password=REDIS_PASSWORD) as port:
        yield port


@pytest.fixture(scope="module")
def pg_cfg(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs
) -> Iterator[devstack.StackConfig]:
    with tls_postgres(tmp_path_factory.mktemp("tls-pg"), certs, password=PG_PASSWORD) as cfg:
        yield cfg


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The passwords as files, the way Docker and Kubernetes mount secrets."""
    d = tmp_path_factory.mktemp("secrets")
    (d / "redis").write_text(REDIS_PASSWORD + "\n")
    (d / "pg").write_text(PG_PASSWORD + "\n")
    return {
        "MESH_REDIS_PASSWORD_FILE": str(d / "redis"),
        "MESH_POSTGRES_PASSWORD_FILE": str(d / "pg"),
    }


def tls_env(redis_port: int, pg_cfg: devstack.StackConfig, certs: Certs) -> dict[str, str]:
    return {
        "MESH_REDIS_URL": f"rediss://127.0.0.1:{redis_port}/0",
        "MESH_REDIS_USERNAME": REDIS_USER,
        "MESH_REDIS_SSL_CA_FILE": str(certs.ca),
        "MESH_POSTGRES_DSN": pg_cfg.postgres_dsn,
        "MESH_POSTGRES_SSLMODE": "verify-full",
        "MESH_POSTGRES_SSLROOTCERT": str(certs.ca),
    }


def settings(redis_port: int, pg_cfg: devstack.StackConfig, certs: Certs, **over: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": f"rediss://127.0.0.1:{redis_port}/0",
        "redis_username": REDIS_USER,
        "redis_password": REDIS_PASSWORD,
        "redis_ssl_ca_file": str(certs.ca),
        "postgres_dsn": pg_cfg.postgres_dsn,
        "postgres_password": PG_PASSWORD,
        "postgres_sslmode": "verify-full",
        "postgres_sslrootcert": str(certs.ca),
    }
    return Settings(**{**base, **over})


@pytest.fixture(scope="module")
def migrated(redis_port: int, pg_cfg: devstack.StackConfig, certs: Certs) -> None:
    import asyncio

    asyncio.run(migrate(settings(redis_port, pg_cfg, certs)))  # itself over TLS


TICKET = {"ticket_id": "T-1", "customer": "a@example.com", "order_id": "O-1", "amount_cents": 900}


async def test_the_mesh_client_works_over_tls_with_passwords_from_files(
    redis_port: int,
    pg_cfg: devstack.StackConfig,
    certs: Certs,
    secret_files: dict[str, str],
    migrated: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in {**tls_env(redis_port, pg_cfg, certs), **secret_files}.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.redis_password is not None and s.redis_password.get_secret_value() == REDIS_PASSWORD
    async with Mesh(s) as mesh:
        sent = await mesh.publish("ticket.submitted", TICKET, session_id="tls-1")
        pool = await mesh.pg()
        row = await pool.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert row is not None and row["ssl"] is True and row["version"].startswith("TLS")
        entries = await mesh.redis.xrange("refund:tickets")
        assert [json.loads(f[b"envelope"])["event_id"] for _, f in entries] == [sent.event_id]
        who = await mesh.redis.acl_whoami()
        assert who in (REDIS_USER, REDIS_USER.encode())


async def test_an_agent_process_runs_over_tls_from_its_settings_alone(
    redis_port: int,
    pg_cfg: devstack.StackConfig,
    certs: Certs,
    secret_files: dict[str, str],
    migrated: None,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(tls_env(redis_port, pg_cfg, certs), **secret_files)
    env.update(
        MESH_AGENTS_MODULE="refund_desk",
        MESH_HTTP_PORT="0",
        PYTHONPATH=os.pathsep.join((str(ROOT), str(ROOT / "examples"))),
        PYTHONUNBUFFERED="1",
    )
    intake = MeshProcess(["agent", "run", "intake"], "intake", env, tmp_path)
    request.addfinalizer(intake.close)  # after the report, which attaches its log
    try:
        s = settings(redis_port, pg_cfg, certs)
        async with Mesh(s) as mesh:
            await mesh.publish(
                "ticket.submitted", {**TICKET, "ticket_id": "T-2"}, session_id="tls-2"
            )
            pool = await mesh.pg()

            async def handled() -> bool:
                n = await pool.fetchval(
                    "SELECT count(*) FROM mesh_actions"
                    " WHERE agent = 'intake' AND session_id = 'tls-2'"
                )
                return bool(n)

            await eventually(handled, timeout=60, what="intake handling the ticket over TLS")
            classified = await mesh.redis.xrange("refund:classified")
            assert any(json.loads(f[b"envelope"])["session_id"] == "tls-2" for _, f in classified)
    finally:
        intake.terminate()
        log = intake.log()
    assert REDIS_PASSWORD not in log and PG_PASSWORD not in log


async def test_redis_refuses_without_the_ca_in_plain_text_and_with_a_wrong_password(
    redis_port: int, pg_cfg: devstack.StackConfig, certs: Certs
) -> None:
    unverified = "CERTIFICATE_VERIFY_FAILED"
    refusals: list[tuple[dict[str, Any], type[Exception], str | None]] = [
        ({"redis_ssl_ca_file": None}, redis.exceptions.ConnectionError, unverified),
        ({"redis_ssl_ca_file": str(certs.other_ca)}, redis.exceptions.ConnectionError, unverified),
        ({"redis_password": "wrong-password"}, redis.exceptions.AuthenticationError, None),
        ({"redis_url": f"redis://127.0.0.1:{redis_port}/0", "redis_ssl_ca_file": None},
         redis.exceptions.ConnectionError, None),
    ]  # fmt: skip
    for over, kind, text in refusals:
        s = settings(redis_port, pg_cfg, certs, **over)
        client = redis_client(s, socket_timeout=5)
        try:
            with pytest.raises(kind, match=text) as refused:
                await client.ping()
        finally:
            await client.aclose()
        if text == unverified:  # a process does not wait for this: it stops, naming why
            with pytest.raises(Misconfigured, match=r"invalid setting redis_url: .*CERTIFICATE"):
                outage_reason(Server.redis(s.redis_url), refused.value)
    ok = redis_client(settings(redis_port, pg_cfg, certs))
    assert await ok.ping()
    await ok.aclose()


async def test_postgres_refuses_without_the_ca_in_plain_text_and_with_a_wrong_password(
    redis_port: int, pg_cfg: devstack.StackConfig, certs: Certs
) -> None:
    refusals: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"postgres_sslrootcert": None}, ssl.SSLCertVerificationError),  # the system's store
        ({"postgres_sslrootcert": str(certs.other_ca)}, ssl.SSLCertVerificationError),
        ({"postgres_sslmode": "disable", "postgres_sslrootcert": None},
         asyncpg.InvalidAuthorizationSpecificationError),  # pg_hba: no entry without TLS
        ({"postgres_password": "wrong-password"}, asyncpg.InvalidPasswordError),
    ]  # fmt: skip
    for over, kind in refusals:
        s = settings(redis_port, pg_cfg, certs, **over)
        with pytest.raises(kind) as refused:
            conn = await pg_connect(s, timeout=10)
            await conn.close()
        with pytest.raises(Misconfigured):  # none of these is worth waiting for
            outage_reason(Server.postgres(s.postgres_dsn), refused.value)
    for mode in ("require", "verify-ca", "verify-full"):  # each encrypts
        conn = await pg_connect(settings(redis_port, pg_cfg, certs, postgres_sslmode=mode))
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        finally:
            await conn.close()


async def test_redis_with_client_certificates_wants_ours(
    tmp_path: Path, certs: Certs, pg_cfg: devstack.StackConfig
) -> None:
    """Mutual TLS (tls-auth-clients yes): MESH_REDIS_SSL_CERT_FILE/KEY_FILE are presented."""
    with tls_redis(
        tmp_path, certs, user=REDIS_USER, password=REDIS_PASSWORD, client_certs=True
    ) as port:
        without = redis_client(settings(port, pg_cfg, certs), socket_timeout=5)
        with pytest.raises(redis.exceptions.ConnectionError):
            await without.ping()
        await without.aclose()
        mine = {"redis_ssl_cert_file": str(certs.client_cert),
                "redis_ssl_key_file": str(certs.client_key)}  # fmt: skip
        client = redis_client(settings(port, pg_cfg, certs, **mine), socket_timeout=5)
        try:
            assert await client.ping()
        finally:
            await client.aclose()


def test_unusable_tls_files_fail_at_once_naming_the_setting(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"redis_url": "rediss://h:1/0", "redis_ssl_ca_file": missing}, "redis_ssl_ca_file"),
        ({"redis_url": "redis://h:1/0", "redis_ssl_ca_file": missing}, "redis_url"),
        ({"postgres_sslmode": "verify-full", "postgres_sslrootcert": missing},
         "postgres_sslrootcert"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": missing}, "kafka_ssl_ca_file"),
        ({"kafka_ssl_ca_file": missing}, "kafka_security_protocol"),
        ({"kafka_security_protocol": "SASL_SSL"}, "kafka_sasl_username"),
    ]  # fmt: skip
    from agentmesh.connect import postgres_kwargs, redis_kwargs

    for over, setting in cases:
        s = Settings(**over)
        with pytest.raises(Misconfigured) as err:
            redis_kwargs(s)
            postgres_kwargs(s)
            kafka_kwargs(s)
        assert str(err.value).startswith(f"invalid setting {setting}:"), (over, str(err.value))


# -- Kafka: the settings reach every client ---------------------------------------------------
def _clients(s: Settings) -> list[Any]:
    """The AIOKafkaClient inside the relay's producer, replay's consumer, the probe, the admin."""
    from aiokafka.admin import AIOKafkaAdminClient

    from agentmesh.connect import kafka_kwargs as kw

    producer, consumer, probe = kafka.producer(s), kafka.consumer(s), kafka.probe_consumer(s)
    admin = AIOKafkaAdminClient(**kw(s))
    return [producer.client, consumer._client, probe._client, admin._client]


async def test_sasl_scram_over_tls_settings_reach_every_kafka_client(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "kafka-secret"
    secret.write_text("kafka-api-secret-77\n")
    monkeypatch.setenv("MESH_KAFKA_SASL_PASSWORD_FILE", str(secret))
    s = Settings(
        kafka_bootstrap="broker-1.example:9096,broker-2.example:9096",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="mesh-relay",
        kafka_ssl_ca_file=str(certs.ca),
    )
    for c in _clients(s):
        assert c._bootstrap_servers == "broker-1.example:9096,broker-2.example:9096"
        assert c._security_protocol == "SASL_SSL"
        assert c._sasl_mechanism == "SCRAM-SHA-512"
        assert (c._sasl_plain_username, c._sasl_plain_password) == (
            "mesh-relay",
            "kafka-api-secret-77",
        )
        ctx = c._ssl_context
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert [dict(x[0] for x in ca["subject"])["commonName"] for ca in ctx.get_ca_certs()] == [
            "agentmesh test ca"
        ]


async def test_ssl_without_a_ca_file_trusts_the_system_store_and_plaintext_has_no_tls() -> None:
    """Public managed Kafka (MSK, Confluent Cloud) has certificates from public CAs."""
    s = Settings(kafka_security_protocol="SSL")
    ctx = kafka_kwargs(s)["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == len(ssl.create_default_context().get_ca_certs())
    plain = _clients(Settings())
    assert {c._security_protocol for c in plain} == {"PLAINTEXT"}
    assert {c._ssl_context for c in plain} == {None}
    sasl_plain = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u",
                          kafka_sasl_password="p-1234")  # fmt: skip
    kw = kafka_kwargs(sasl_plain)
    assert (kw["sasl_mechanism"], "ssl_context" in kw) == ("PLAIN", False)
