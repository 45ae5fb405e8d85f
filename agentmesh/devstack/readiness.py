"""Is a service answering? Cheap synchronous probes, plus free loopback ports for tests.

A live pid is not enough (redis replays its AOF, a broker may not have bound yet), so
``up`` waits on these. They speak just enough of each protocol to need no client library
and no event loop.
"""

from __future__ import annotations

import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Callable

from agentmesh.devstack.config import S3_BUCKET, StackConfig, StackError
from agentmesh.devstack.postgres import psql

__all__ = [
    "PROBES",
    "free_port",
    "free_ports",
    "kafka_broker",
    "kafka_ready",
    "pg_ready",
    "redis_ping",
    "s3_ready",
    "tcp_open",
]


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def redis_ping(cfg: StackConfig) -> bool:
    """PING answers +PONG (not -LOADING while the AOF is replayed)."""
    try:
        with socket.create_connection((cfg.host, cfg.redis_port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def kafka_broker(cfg: StackConfig) -> tuple[str, int] | None:
    """Raw Metadata v1 request; the first advertised broker, or None if no answer.

    Hand-rolled so the sync readiness check needs no client library and no event loop.
    """
    client = b"agentmesh-devstack"
    corr = 7
    req = struct.pack(">hhih", 3, 1, corr, len(client)) + client + struct.pack(">i", -1)
    try:
        with socket.create_connection((cfg.host, cfg.kafka_port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(struct.pack(">i", len(req)) + req)
            (size,) = struct.unpack(">i", _recv_exact(s, 4))
            body = _recv_exact(s, size)
        got_corr, n_brokers = struct.unpack(">ii", body[:8])
        if got_corr != corr or n_brokers < 1:
            return None
        (hlen,) = struct.unpack(">h", body[12:14])
        host = body[14 : 14 + hlen].decode()
        (port,) = struct.unpack(">i", body[14 + hlen : 18 + hlen])
        return host, port
    except (OSError, struct.error, UnicodeDecodeError):
        return None


def kafka_ready(cfg: StackConfig) -> bool:
    """The broker answers a metadata request with at least one broker."""
    return kafka_broker(cfg) is not None


def s3_ready(cfg: StackConfig) -> bool:
    """The bucket answers (s3rver creates it at startup via --configure-bucket)."""
    try:
        url = f"{cfg.s3_endpoint}/{S3_BUCKET}?max-keys=0"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pg_ready(cfg: StackConfig) -> bool:
    """The server runs a query (an open port alone may still be "starting up")."""
    if not tcp_open(cfg.host, cfg.pg_port):
        return False
    try:
        return psql(cfg, "select 1", db="postgres", timeout=5).strip() == "1"
    except StackError:
        return False


#: The probe that says each managed process is ready.
PROBES: dict[str, Callable[[StackConfig], bool]] = {
    "redis": redis_ping,
    "postgres": pg_ready,
    "s3": s3_ready,
    "kafka": kafka_ready,
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (for tests; another process may still take it)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports: all sockets are held open until every port is picked."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
