"""PostgreSQL for the local stack: find the server binaries, initdb a cluster, start it, and
create the mesh database.

PostgreSQL refuses to run as root, and the machines this runs on often are root: then the
cluster belongs to a system user (``agentmesh-pg``) that initdb and postgres run as.

A postmaster killed with SIGKILL leaves its lock files behind (``postmaster.pid`` in the
data dir, ``.s.PGSQL.<port>.lock`` next to its socket). PostgreSQL ignores one whose pid is
gone, but refuses to start ("lock file ... already exists") while that pid is any process
its user may signal: the dead postmaster still a zombie nobody reaped yet, or an unrelated
process that got the pid. ``start`` removes such a file when /proc shows its pid is not a
live postmaster of this cluster, and never while one owns it (``running_postmaster``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

from agentmesh.devstack.config import PG_MAJOR, PG_SYSTEM_USER, StackConfig, StackError
from agentmesh.devstack.procs import fail, is_ours, open_log, spawn

__all__ = [
    "bindir",
    "clear_stale_locks",
    "ensure_db",
    "lock_files",
    "psql",
    "running_postmaster",
    "start",
    "system_account",
]


def bindir() -> Path:
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


def psql(cfg: StackConfig, sql: str, *, db: str | None = None, timeout: float = 10) -> str:
    """Run one statement with psql (no client library needed); its unaligned output."""
    bins = bindir()
    cmd = [
        str(bins / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
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


def system_account() -> tuple[int, int] | None:
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


def _socket_dir(cfg: StackConfig) -> Path:
    return cfg.run_dir / "pgsock"


def lock_files(cfg: StackConfig) -> list[Path]:
    """The lock files a postmaster of this cluster writes, its pid on their first line."""
    return [
        cfg.data_dir("postgres") / "postmaster.pid",
        _socket_dir(cfg) / f".s.PGSQL.{cfg.pg_port}.lock",
    ]


def _lock_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def running_postmaster(cfg: StackConfig) -> int | None:
    """The pid of a live postmaster of this cluster, as its postmaster.pid names it (one
    started without our pidfile, or whose pidfile was lost), else None."""
    pid = _lock_pid(lock_files(cfg)[0])
    return pid if pid is not None and is_ours(cfg, "postgres", pid) else None


def clear_stale_locks(cfg: StackConfig) -> list[Path]:
    """Remove the lock files whose pid is not a live postmaster of this cluster (a killed
    one's: gone, a zombie, or the pid now someone else's); the removed ones. A file that
    cannot be read is left for PostgreSQL to judge."""
    removed: list[Path] = []
    for path in lock_files(cfg):
        pid = _lock_pid(path)
        if pid is None or is_ours(cfg, "postgres", pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        with open_log(cfg, "postgres", ["rm", "-f", *map(str, removed)]) as log:
            log.write(b"stale lock files of a postmaster that is no longer running\n")
    return removed


def start(cfg: StackConfig, deadline: float) -> int:
    """initdb the cluster if it is new, then spawn the postmaster; its pid.

    As root, the data and socket dirs go to the system user, and any ancestor it cannot
    search gets o+x (search only, never read); the changed dirs are listed in the log.
    """
    bins = bindir()
    data, sock = cfg.data_dir("postgres"), _socket_dir(cfg)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock.mkdir(parents=True, exist_ok=True)
    account = system_account()
    if account is not None:
        uid, gid = account
        for d in (data, sock):
            os.chown(d, uid, gid)
        changed = _make_traversable(data, uid, gid) + _make_traversable(sock, uid, gid)
        if changed:
            with open_log(cfg, "postgres", ["chmod", "o+x", *map(str, changed)]):
                pass
    data.chmod(0o700)
    env = {
        "PATH": f"{bins}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(data),
        "LANG": "C.UTF-8" if Path("/usr/lib/locale/C.utf8").exists() else "C",
    }
    if not (data / "PG_VERSION").exists():
        cmd = [
            str(bins / "initdb"), "-D", str(data), "-U", cfg.pg_user, "--auth=trust",
            "-E", "UTF8", f"--locale={env['LANG']}", "--no-instructions",
        ]  # fmt: skip
        with open_log(cfg, "postgres", cmd) as log:
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
            raise fail(cfg, "postgres", f"initdb failed (exit {rc})")
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
    cmd = [str(bins / "postgres"), "-D", str(data)]
    for key, value in settings.items():
        cmd += ["-c", f"{key}={value}"]
    owner = running_postmaster(cfg)
    if owner is not None:  # stack.up adopts one; never take its lock files away
        raise fail(cfg, "postgres", f"a postmaster (pid {owner}) already runs on {data}")
    clear_stale_locks(cfg)
    return spawn(cfg, "postgres", cmd, env=env, account=account, cwd=data)


def ensure_db(cfg: StackConfig) -> None:
    """initdb only makes 'postgres'/'template*': create cfg.pg_db once the server answers."""
    lit = cfg.pg_db.replace("'", "''")
    if psql(cfg, f"select 1 from pg_database where datname = '{lit}'", db="postgres").strip():
        return
    ident = cfg.pg_db.replace('"', '""')
    psql(cfg, f'create database "{ident}"', db="postgres", timeout=30)
