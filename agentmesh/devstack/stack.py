"""up / down / status / kill9 over the stack's services.

Each call works from the pidfiles alone, so it is idempotent and any process (the CLI, a
pytest fixture, a benchmark) can pick up a stack another one started.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Sequence

from agentmesh.devstack import broker, postgres
from agentmesh.devstack.config import (
    POLL,
    PROCESSES,
    S3_BUCKET,
    SERVICES,
    ServiceStatus,
    StackConfig,
    StackError,
)
from agentmesh.devstack.procs import (
    alive,
    fail,
    forget,
    owned_pid,
    signal_all,
    spawn,
    stop_pid,
    tree,
    wait_gone,
)
from agentmesh.devstack.readiness import PROBES, tcp_open

__all__ = ["down", "kill9", "status", "up"]


def _address(cfg: StackConfig, name: str) -> str:
    return {
        "redis": cfg.redis_url,
        "postgres": cfg.postgres_dsn,
        "s3": cfg.s3_endpoint,
        "kafka": cfg.kafka_bootstrap,
    }[name]


def _port(cfg: StackConfig, name: str) -> int:
    return {
        "redis": cfg.redis_port,
        "postgres": cfg.pg_port,
        "s3": cfg.s3_port,
        "kafka": cfg.kafka_port,
    }[name]


def _check_names(services: Sequence[str]) -> None:
    if isinstance(services, str):
        raise TypeError("services must be a sequence of names, not a str")
    unknown = [s for s in services if s not in PROCESSES]
    if unknown:
        raise StackError(f"unknown service(s) {unknown}; known: {', '.join(PROCESSES)}")


def _expand(services: Sequence[str]) -> list[str]:
    """Processes behind the services, in start order ("kafka" brings "s3")."""
    _check_names(services)
    wanted = set(services) | ({"s3"} if "kafka" in services else set())
    return [p for p in PROCESSES if p in wanted]


def _wait_ready(cfg: StackConfig, name: str, pid: int, deadline: float) -> None:
    probe = PROBES[name]
    while True:
        if probe(cfg):
            return
        if not alive(pid):
            code = forget(pid)
            cfg.pid_file(name).unlink(missing_ok=True)
            raise fail(cfg, name, f"exited during startup (exit code {code})")
        if time.monotonic() >= deadline:
            raise fail(cfg, name, f"not answering on {_address(cfg, name)} (pid {pid})")
        time.sleep(POLL)


def _start_redis(cfg: StackConfig, port: int) -> int:
    data = cfg.data_dir("redis")
    data.mkdir(parents=True, exist_ok=True)
    redis = shutil.which("redis-server")
    if redis is None:
        raise StackError("redis: redis-server not found; run deploy/install-local-deps.sh")
    cmd = [
        redis, "--port", str(port), "--bind", cfg.host, "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--daemonize", "no", "--protected-mode", "no",
    ]  # fmt: skip
    return spawn(cfg, "redis", cmd, cwd=data)


def _adopt_postmaster(cfg: StackConfig) -> int | None:
    """A live postmaster of this cluster without our pidfile (it was lost): recorded as ours,
    so it is neither started twice nor its lock file taken away."""
    pid = postgres.running_postmaster(cfg)
    if pid is not None:
        cfg.pid_file("postgres").write_text(f"{pid}\n")
    return pid


def _start(cfg: StackConfig, name: str, deadline: float, storage: str) -> int:
    port = _port(cfg, name)
    grace = time.monotonic() + 3  # a just-stopped server may still be closing its socket
    while tcp_open(cfg.host, port) and time.monotonic() < grace:
        time.sleep(POLL)
    if tcp_open(cfg.host, port):
        raise fail(cfg, name, f"port {cfg.host}:{port} is already in use by another process")
    if name == "redis":
        return _start_redis(cfg, port)
    if name == "postgres":
        return postgres.start(cfg, deadline)
    if name == "s3":
        return broker.start_s3rver(cfg)
    return broker.start_tansu(cfg, storage)


def _status_one(cfg: StackConfig, name: str) -> ServiceStatus:
    pid = owned_pid(cfg, name)
    address = _address(cfg, name)
    if pid is None:
        return ServiceStatus(name, False, None, address, "not running")
    answering = PROBES[name](cfg)
    details = [] if answering else [f"pid {pid} alive but not answering on {address}"]
    if name == "kafka":
        details.append(broker.storage_detail(cfg))
        if details[-1].startswith("storage=s3") and owned_pid(cfg, "s3") is None:
            details.append("s3rver is down: produce/fetch will fail")
            answering = False
    elif name in ("redis", "postgres", "s3"):
        details.append(f"data={cfg.data_dir(name)}")
    return ServiceStatus(name, answering, pid, address, "; ".join(d for d in details if d))


def up(
    cfg: StackConfig, services: Sequence[str] = SERVICES, *, timeout: float = 60
) -> list[ServiceStatus]:
    """Start the services that are not running and wait until each answers.

    Idempotent: a running, answering service is left alone (same pid). A stale pidfile is
    cleaned up and the service restarted; so are PostgreSQL's own lock files a killed
    postmaster left (``postgres.clear_stale_locks``), while a live postmaster of the cluster
    whose pidfile was lost is adopted, not started twice. (Redis runs without a pidfile of its
    own, s3rver and Tansu write none.) ``timeout`` bounds the whole call. A service that
    fails to come up is stopped again and StackError names it, with its log tail.
    """
    procs = _expand(services)
    deadline = time.monotonic() + timeout
    for d in (cfg.root, cfg.logs_dir, cfg.run_dir):
        d.mkdir(parents=True, exist_ok=True)
    s3_problem = ""
    for name in procs:
        if name == "s3":
            s3cmd = broker.s3rver_cmd(cfg)
            if isinstance(s3cmd, str) and "s3" not in services:
                s3_problem = s3cmd  # kafka falls back to memory:// storage
                continue
        storage = "memory://tansu/" if s3_problem else f"s3://{S3_BUCKET}/"
        pid = owned_pid(cfg, name)
        if pid is None and name == "postgres":
            pid = _adopt_postmaster(cfg)
        started = pid is None
        if pid is None:
            pid = _start(cfg, name, deadline, storage)
        try:
            _wait_ready(cfg, name, pid, deadline)
            if name == "postgres":
                postgres.ensure_db(cfg)
        except StackError:
            if started:
                with contextlib.suppress(StackError):
                    stop_pid(cfg, name, pid, timeout=5)
            raise
    result = status(cfg, services)
    if s3_problem:
        for st in result:
            if st.name == "kafka":
                st.detail = f"{st.detail}; s3rver unavailable: {s3_problem}"
    return result


def down(cfg: StackConfig, services: Sequence[str] = SERVICES, *, timeout: float = 30) -> None:
    """Stop services (graceful signal, wait up to timeout, then SIGKILL). Idempotent.

    Leaves no process behind: the whole process tree (e.g. PostgreSQL backends) is tracked.
    """
    errors: list[str] = []
    for name in reversed(_expand(services)):
        pid = owned_pid(cfg, name)
        if pid is None:
            continue
        try:
            stop_pid(cfg, name, pid, timeout)
        except StackError as exc:
            errors.append(str(exc))
    if errors:
        raise StackError("; ".join(errors))


def status(cfg: StackConfig, services: Sequence[str] = SERVICES) -> list[ServiceStatus]:
    """One ServiceStatus per requested service: running = pid alive AND it answers."""
    _check_names(services)
    return [_status_one(cfg, name) for name in services]


def kill9(cfg: StackConfig, service: str) -> None:
    """SIGKILL a service's processes now, for fault-injection tests.

    "kafka" kills the broker only (its S3 storage keeps running, like a broker crash);
    kill "s3" separately to lose the storage. The pidfile is left behind, as after a real
    crash (and PostgreSQL's postmaster.pid); ``up`` cleans them up and restarts the service.
    """
    _check_names([service])
    pid = owned_pid(cfg, service)
    if pid is None:
        return
    pids = tree(pid)
    signal_all(pids, signal.SIGKILL)
    left = wait_gone(pids, 10)
    if left:
        raise StackError(f"{service}: processes {sorted(left)} survived SIGKILL")
