"""Process supervision for the local stack: spawn detached with a log and a pidfile, tell
whether a pid is still ours, and stop a whole process tree.

Docker is not available where this runs, so servers are plain processes; everything here
works from pidfiles and /proc so a later CLI call (another interpreter) can find and stop
what an earlier one started, without ever signalling a recycled pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from agentmesh.devstack.config import LOG_TAIL_LINES, POLL, StackConfig, StackError

__all__ = [
    "HAVE_PROC",
    "alive",
    "cmdline",
    "fail",
    "forget",
    "is_ours",
    "log_tail",
    "open_log",
    "owned_pid",
    "read_pid",
    "signal_all",
    "spawn",
    "stop_pid",
    "tree",
    "wait_gone",
]

HAVE_PROC = Path("/proc/self/stat").exists()

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


def alive(pid: int) -> bool:
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
    if not HAVE_PROC:
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


def forget(pid: int) -> int | None:
    """Drop a child we started from the reaping table; its exit code if it has exited."""
    child = _CHILDREN.pop(pid, None)
    return child.returncode if child is not None else None


def cmdline(pid: int) -> str:
    """The pid's command line, space-separated ("" when it is gone or unreadable)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def tree(pid: int) -> set[int]:
    """pid, its descendants and its process-group members.

    Taken before signalling: PostgreSQL backends call setsid(), so killpg() misses them,
    and once the postmaster dies they are reparented and can no longer be found by ppid.
    """
    pids = {pid}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if HAVE_PROC else ():
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


def signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send sig to each pid; one already gone (or not ours to signal) is skipped."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until none of pids runs; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(POLL)
        left = {p for p in left if alive(p)}
    return left


def read_pid(cfg: StackConfig, name: str) -> int | None:
    """The pid in name's pidfile, or None (no file, or not a number)."""
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


def is_ours(cfg: StackConfig, name: str, pid: int) -> bool:
    """pid runs (a zombie does not) and /proc shows it is this stack's server `name`, not a
    process that got the pid of a dead one. Without /proc, a live pid is taken as ours."""
    return alive(pid) and (not HAVE_PROC or all(m in cmdline(pid) for m in _markers(cfg, name)))


def owned_pid(cfg: StackConfig, name: str) -> int | None:
    """The live pid of our process for name; a stale pidfile is removed."""
    pid = read_pid(cfg, name)
    if pid is None:
        return None
    if is_ours(cfg, name, pid):
        return pid
    cfg.pid_file(name).unlink(missing_ok=True)
    return None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, indented, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.strip("\n").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in tail) or "    (log is empty)"


def fail(cfg: StackConfig, name: str, message: str) -> StackError:
    """A StackError naming the service, its log and the log's tail (so nobody has to dig)."""
    log = cfg.log_file(name)
    return StackError(f"{name}: {message} (log: {log})\n{log_tail(log)}")


def open_log(cfg: StackConfig, name: str, cmd: Sequence[str]) -> IO[bytes]:
    """name's log opened for appending, with a header line saying what starts now."""
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    f = cfg.log_file(name).open("ab")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(f"\n=== {stamp} devstack start: {' '.join(cmd)}\n".encode())
    f.flush()
    return f


def spawn(
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
    (unless `pidfile` is False: the caller keeps its own record, as background does)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open_log(cfg, name, cmd) as log:
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
            raise fail(cfg, name, f"cannot start {cmd[0]}: {exc}") from exc
    _CHILDREN[proc.pid] = proc
    if pidfile:
        cfg.pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def stop_pid(cfg: StackConfig, name: str, pid: int, timeout: float) -> None:
    """Graceful signal, wait, then SIGKILL the whole tree; raise if anything survives."""
    pids = tree(pid)
    signal_all([pid], _STOP_SIGNALS.get(name, signal.SIGTERM))
    left = wait_gone(pids, timeout)
    if left:
        if alive(pid):  # the main process may have forked more meanwhile
            left |= tree(pid)
        signal_all(left, signal.SIGKILL)
        left = wait_gone(left, 10)
    if left:
        raise StackError(f"{name}: processes {sorted(left)} survived SIGKILL")
    cfg.pid_file(name).unlink(missing_ok=True)
    _CHILDREN.pop(pid, None)
