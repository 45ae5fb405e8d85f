"""A throw-away certificate authority for TLS tests: a self-signed CA and a server certificate
for 127.0.0.1 and localhost, made with the openssl command line (present wherever PostgreSQL
and Redis are)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server's certificate, signed by the CA
    key: Path  # the server's key (0600)
    other_ca: Path  # a CA that signed nothing here: trusting it must not be enough
    client_cert: Path  # a client certificate signed by the CA (mutual TLS)
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> Certs:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN=agentmesh test {name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.crt", cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)  # fmt: skip
    (d / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
             cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=mesh-agent",
             "-keyout", "client.key", "-out", "client.csr", cwd=d)  # fmt: skip
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "client.ext", "-out", "client.crt",
             cwd=d)  # fmt: skip
    for key in ("server.key", "client.key"):
        (d / key).chmod(0o600)
    return Certs(ca=d / "ca.crt", cert=d / "server.crt", key=d / "server.key",
                 other_ca=d / "other-ca.crt", client_cert=d / "client.crt",
                 client_key=d / "client.key")  # fmt: skip
