"""No secret in any output: `mesh config` (table and JSON), agents' and relays' logs, CLI
results and CLI errors, including errors from a wrong password and a server that refuses.
The run uses a TLS Redis and PostgreSQL that want passwords (tests.tls_servers) and the
session's Kafka; every byte every process printed is searched for each known secret."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from agentmesh import Settings, devstack
from agentmesh.connect import pg_connect
from agentmesh.process import logs, redact
from tests.conftest import ROOT, MeshProcess, eventually
from tests.helpers import mesh
from tests.tls_certs import Certs, make_certs
from tests.tls_servers import tls_postgres, tls_redis

REDIS_USER = "mesh-agent"
REDIS_PW = "redis-known-pw-51c2"
PG_PW = "pg-known-pw-8e4d"
KAFKA_PW = "kafka-known-pw-0a9b"
WRONG_PW = "wrong-known-pw-3f6e"  # a wrong password is a secret too (it may be a real one)
SECRETS = (REDIS_PW, PG_PW, KAFKA_PW, WRONG_PW)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs
) -> Iterator[tuple[int, devstack.StackConfig]]:
    with tls_redis(tmp_path_factory.mktemp("r"), certs, user=REDIS_USER, password=REDIS_PW) as port:
        with tls_postgres(tmp_path_factory.mktemp("p"), certs, password=PG_PW) as pg:
            yield port, pg


def env_with(
    servers: tuple[int, devstack.StackConfig],
    certs: Certs,
    stack: devstack.StackConfig,
    *,
    in_urls: bool,
    **over: str,
) -> dict[str, str]:
    """The passwords as settings of their own (in_urls=False) or inside the URL and DSN."""
    redis_port, pg = servers
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_REDIS_USERNAME=REDIS_USER,
        MESH_REDIS_SSL_CA_FILE=str(certs.ca),
        MESH_POSTGRES_SSLMODE="verify-full",
        MESH_POSTGRES_SSLROOTCERT=str(certs.ca),
        MESH_KAFKA_BOOTSTRAP=stack.kafka_bootstrap,
        MESH_KAFKA_SASL_PASSWORD=KAFKA_PW,  # unused with PLAINTEXT, but set: never printed
        MESH_KAFKA_PARTITIONS="2",
        MESH_KAFKA_REQUEST_TIMEOUT_MS="5000",
        MESH_AUDIT_TOPIC=f"secrets-{os.getpid()}-{in_urls}",
        MESH_AGENTS_MODULE="refund_desk",
        MESH_HTTP_PORT="0",
        MESH_RELAY_POLL_INTERVAL_S="0.2",
        MESH_LOG_LEVEL="DEBUG",  # the chattiest logs there are
        PYTHONPATH=os.pathsep.join((str(ROOT), str(ROOT / "examples"))),
        PYTHONUNBUFFERED="1",
    )
    if in_urls:
        env["MESH_REDIS_URL"] = f"rediss://{REDIS_USER}:{REDIS_PW}@127.0.0.1:{redis_port}/0"
        env["MESH_POSTGRES_DSN"] = f"postgresql://mesh:{PG_PW}@127.0.0.1:{pg.pg_port}/mesh"
    else:
        env["MESH_REDIS_URL"] = f"rediss://127.0.0.1:{redis_port}/0"
        env["MESH_REDIS_PASSWORD"] = REDIS_PW
        env["MESH_POSTGRES_DSN"] = pg.postgres_dsn
        env["MESH_POSTGRES_PASSWORD"] = PG_PW
    env.update(over)
    return env


@pytest.fixture
def started() -> Iterator[Callable[[MeshProcess], MeshProcess]]:
    """Processes of the test, closed after its report (which attaches their logs)."""
    procs: list[MeshProcess] = []

    def add(p: MeshProcess) -> MeshProcess:
        procs.append(p)
        return p

    yield add
    for p in procs:
        p.close()


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process with `env` would load (to watch the run from here)."""
    for k in [k for k in os.environ if k.startswith("MESH_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("MESH_"):
            monkeypatch.setenv(k, v)
    return Settings()


def assert_clean(what: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, (
            f"{what} printed a secret: …{text[max(0, text.find(secret) - 200) :][:400]}…"
        )


@pytest.mark.parametrize("in_urls", [False, True], ids=["settings", "in-urls"])
async def test_no_output_of_a_whole_run_holds_a_password(
    servers: tuple[int, devstack.StackConfig],
    certs: Certs,
    stack: devstack.StackConfig,
    tmp_path: Path,
    in_urls: bool,
    monkeypatch: pytest.MonkeyPatch,
    started: Callable[[MeshProcess], MeshProcess],
) -> None:
    env = env_with(servers, certs, stack, in_urls=in_urls)
    outputs: dict[str, str] = {}

    def run(*args: str, code: int | None = 0, **over: str) -> str:
        r = mesh({**env, **over}, *args)
        text = r.stdout + r.stderr
        outputs[f"{len(outputs)}: mesh {' '.join(args)} {sorted(over)}"] = text
        if code is not None:
            assert r.returncode == code, text
        return r.stdout

    assert run("db", "migrate") is not None
    shown = json.loads(run("config", "--json"))
    assert shown["redis_password"] == ("***" if not in_urls else None)
    assert shown["kafka_sasl_password"] == "***"
    assert ("***@" in shown["redis_url"]) == in_urls
    table = run("config")
    assert "***" in table and "MESH_KAFKA_SASL_PASSWORD" in table
    session = f"sec-{in_urls}"
    ticket = {"ticket_id": session, "customer": "c@example.com", "order_id": "O-1",
              "amount_cents": 700, "text": "arrived broken"}  # fmt: skip
    run("publish", "refund:tickets", "-t", "ticket.submitted", "-s", session, "-p",
        json.dumps(ticket))  # fmt: skip
    intake = started(MeshProcess(["agent", "run", "intake"], "intake", env, tmp_path))
    relay = started(MeshProcess(["relay", "run"], "relay", env, tmp_path))
    conn = await pg_connect(settings_from(env, monkeypatch))
    try:

        async def handled_and_relayed() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM mesh_actions WHERE agent = 'intake'"
                    "   AND session_id = $1) AND NOT EXISTS (SELECT 1 FROM mesh_outbox"
                    "   WHERE session_id = $1 AND published_at IS NULL)",
                    session,
                )
            )

        await eventually(handled_and_relayed, timeout=90, what="intake and the relay at work")
        assert "ticket.classified" in run("replay", session)
        run("status")
    finally:
        await conn.close()
        for p in (intake, relay):
            p.terminate()
            outputs[p.name] = p.log()
    # errors that name a server: a wrong password (in the URL and as a setting), no server
    wrong_url = env["MESH_REDIS_URL"].replace(REDIS_PW, WRONG_PW)
    wrong_dsn = env["MESH_POSTGRES_DSN"].replace(PG_PW, WRONG_PW)
    redis_refused = {"MESH_REDIS_URL": wrong_url} if in_urls else {"MESH_REDIS_PASSWORD": WRONG_PW}
    pg_refused = (
        {"MESH_POSTGRES_DSN": wrong_dsn} if in_urls else {"MESH_POSTGRES_PASSWORD": WRONG_PW}
    )
    bad_port = env["MESH_POSTGRES_DSN"].replace(f":{servers[1].pg_port}/", ":notaport/")
    no_redis = wrong_url.replace(f":{servers[0]}/", ":1/")
    refused = [
        started(MeshProcess(["agent", "run", "intake"], name, {**env, **extra}, tmp_path))
        for name, extra in (("refused-redis", redis_refused), ("refused-pg", pg_refused))
    ]  # a refused password is a misconfiguration: each exits at once (meanwhile, the CLI)
    run("status", code=None, **redis_refused)
    run("sessions", code=None, **pg_refused)
    run("sessions", code=None, MESH_POSTGRES_DSN=bad_port)
    run("dlq", "list", code=None, MESH_REDIS_URL=no_redis)
    for p in refused:
        assert p.wait(60) != 0
        outputs[p.name] = p.log()
    assert "invalid setting" in outputs["refused-redis"] + outputs["refused-pg"]
    assert len(outputs) == 14  # 10 CLI runs, the agent, the relay, 2 refused agents
    for what, text in outputs.items():
        assert_clean(what, text)


# -- the redaction itself ---------------------------------------------------------------------
def test_redact_masks_known_secrets_and_password_shapes() -> None:
    redact.remember("s3cr3t/with@odd:chars")
    cases = {
        "connect redis://user:hunter2@h:6379/0 failed": "connect redis://user:***@h:6379/0 failed",
        "rediss://:hunter2@h/0": "rediss://:***@h/0",
        "postgresql://mesh:pa%40ss@db/mesh?sslmode=verify-full":
            "postgresql://mesh:***@db/mesh?sslmode=verify-full",
        "host=db user=mesh password=hunter2 dbname=x": "host=db user=mesh password=*** dbname=x",
        "Authorization: Bearer abc.def-123": "Authorization: Bearer ***",
        "value s3cr3t/with@odd:chars here": "value *** here",
        "url-encoded s3cr3t%2Fwith%40odd%3Achars": "url-encoded ***",
        "without one postgresql://mesh@db/mesh": "without one postgresql://mesh@db/mesh",
    }  # fmt: skip
    for raw, want in cases.items():
        assert redact.redact(raw) == want


def test_library_log_lines_and_tracebacks_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(fmt="json", level="INFO")
    try:
        raise ValueError("cannot connect to postgresql://mesh:tb-secret-1@db:5432/mesh")
    except ValueError:
        logging.getLogger("asyncpg.pool").exception("pool failed for password=kv-secret-2")
        structlog.get_logger("t").exception("agent failed", dsn="redis://:sl-secret-3@h/0")
    err = capsys.readouterr().err
    assert "tb-secret-1" not in err and "kv-secret-2" not in err and "sl-secret-3" not in err
    assert "postgresql://mesh:***@db" in err and "redis://:***@h/0" in err


def test_secret_files_trailing_newline_both_set_and_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    f = tmp_path / "pw"
    f.write_text("from-file-pw-77\n")
    monkeypatch.setenv("MESH_POSTGRES_PASSWORD_FILE", str(f))
    s = Settings()
    assert s.postgres_password is not None
    assert s.postgres_password.get_secret_value() == "from-file-pw-77"
    assert "from-file-pw-77" not in repr(s) and "from-file-pw-77" not in str(s.model_dump())
    monkeypatch.setenv("MESH_POSTGRES_PASSWORD", "also-set-pw")
    with pytest.raises(ValidationError, match="not both") as both:
        Settings()
    assert "also-set-pw" not in str(both.value)
    monkeypatch.delenv("MESH_POSTGRES_PASSWORD")
    monkeypatch.setenv("MESH_POSTGRES_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="MESH_POSTGRES_PASSWORD_FILE: cannot read"):
        Settings()
