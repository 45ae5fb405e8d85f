"""What the local stack is: its services, where it lives, what it reports, how it fails.

Kept free of behaviour so every other devstack module (and callers that only need a
StackConfig) can import it without pulling in process or probe code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOG_TAIL_LINES",
    "PG_MAJOR",
    "PG_SYSTEM_USER",
    "POLL",
    "PROCESSES",
    "PROJECT_DIR",
    "S3_ACCESS_KEY",
    "S3_BUCKET",
    "S3_SECRET_KEY",
    "SERVICES",
    "ServiceStatus",
    "StackConfig",
    "StackError",
]

#: Public services. "kafka" implies the internal "s3" process (s3rver) plus the broker.
SERVICES: tuple[str, ...] = ("redis", "postgres", "kafka")
#: Every process the stack manages, in start order (stop order is the reverse).
PROCESSES: tuple[str, ...] = ("redis", "postgres", "s3", "kafka")

PG_SYSTEM_USER = "agentmesh-pg"
PG_MAJOR = "15"
S3_BUCKET = "tansu"
#: s3rver accepts any well-formed signature made with this fixed key pair.
S3_ACCESS_KEY = "S3RVER"
S3_SECRET_KEY = "S3RVER"

#: The repository root (agentmesh/devstack/config.py -> three levels up).
PROJECT_DIR = Path(__file__).resolve().parents[2]
#: How often waits re-check a process or a port, in seconds.
POLL = 0.1
LOG_TAIL_LINES = 30


class StackError(RuntimeError):
    """A service could not be started, answered nothing, or would not die."""


@dataclass(kw_only=True)
class StackConfig:
    """Where the stack lives and which loopback ports it uses."""

    root: Path
    host: str = "127.0.0.1"
    redis_port: int = 6390
    pg_port: int = 5440
    kafka_port: int = 9093
    s3_port: int = 4569
    pg_user: str = "mesh"
    pg_db: str = "mesh"

    def __post_init__(self) -> None:
        # Absolute, so pidfiles and the postgres data dir do not depend on the caller's cwd.
        self.root = Path(self.root).expanduser().resolve()

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def postgres_dsn(self) -> str:
        return f"postgresql://{self.pg_user}@{self.host}:{self.pg_port}/{self.pg_db}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def log_file(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def data_dir(self, name: str) -> Path:
        return self.root / {"postgres": "pg", "s3": "s3"}.get(name, name)


@dataclass
class ServiceStatus:
    """What ``status``/``up`` report for one service."""

    name: str
    running: bool
    pid: int | None
    address: str
    detail: str = ""
