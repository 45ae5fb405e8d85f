"""A Redis and a PostgreSQL that speak only TLS and want a password, for the TLS tests: each
on a free loopback port, with certificates from `tests.tls_certs`, stopped afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agentmesh import devstack
from agentmesh.devstack import postgres
from tests.tls_certs import Certs


@contextmanager
def tls_redis(
    d: Path, certs: Certs, *, user: str, password: str, client_certs: bool = False
) -> Iterator[int]:
    """redis-server with its plain port off, a TLS port, and one ACL user (`default` off);
    with `client_certs`, a client must also show a certificate signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)
    port = devstack.free_port()
    conf = d / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                "port 0",
                f"tls-port {port}",
                "bind 127.0.0.1",
                f"tls-cert-file {certs.cert}",
                f"tls-key-file {certs.key}",
                f"tls-ca-cert-file {certs.ca}",
                f"tls-auth-clients {'yes' if client_certs else 'no'}",
                'save ""',
                "appendonly no",
                f"dir {d}",
                "user default off",
                f"user {user} on >{password} ~* &* +@all",
            ]
        )
        + "\n"
    )
    conf.chmod(0o600)
    log = (d / "redis.log").open("wb")
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not devstack.tcp_open("127.0.0.1", port):
            assert proc.poll() is None, (d / "redis.log").read_text()
            assert time.monotonic() < deadline, "TLS redis did not come up"
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


@contextmanager
def tls_postgres(d: Path, certs: Certs, *, password: str) -> Iterator[devstack.StackConfig]:
    """PostgreSQL (devstack's own start-up) with ssl on, the role's password set, and a
    pg_hba.conf that accepts TCP only over TLS with scram-sha-256 (plain TCP is rejected)."""
    cfg = devstack.StackConfig(root=d, pg_port=devstack.free_port())
    devstack.up(cfg, ("postgres",))
    try:
        data = cfg.data_dir("postgres")
        for src, name in ((certs.cert, "server.crt"), (certs.key, "server.key")):
            shutil.copy(src, data / name)
            account = postgres.system_account()
            if account is not None:
                os.chown(data / name, *account)
            (data / name).chmod(0o600)
        for sql in (
            "ALTER SYSTEM SET ssl = on",
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            f"ALTER ROLE {cfg.pg_user} PASSWORD '{password}'",
        ):
            postgres.psql(cfg, sql)
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 reject\n"
        )
        postgres.psql(cfg, "SELECT pg_reload_conf()")  # this connection still came in as before
        yield cfg
    finally:
        devstack.down(cfg, ("postgres",))
