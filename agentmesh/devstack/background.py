"""Mesh processes on the local stack: the agents, relays and gateway stand-in that `mesh demo`
starts. They run detached, each with a pidfile under root/run/procs/, so `mesh demo --keep`
can leave a working desk behind and `mesh dev down` can stop it before the servers it uses.

A pidfile holds the pid and the process's command line; a pid is only ever signalled while
/proc shows that same command line (a recycled pid is left alone).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agentmesh.devstack.config import StackConfig, StackError
from agentmesh.devstack.procs import alive, cmdline, signal_all, spawn, wait_gone

__all__ = ["LocalProcess", "listed", "start", "stop"]


@dataclass(frozen=True)
class LocalProcess:
    """One mesh process as its pidfile records it."""

    name: str
    pid: int
    cmd: str

    @property
    def running(self) -> bool:
        return alive(self.pid) and self.cmd in cmdline(self.pid)


def _dir(cfg: StackConfig) -> Path:
    return cfg.run_dir / "procs"


def start(cfg: StackConfig, name: str, cmd: Sequence[str], env: dict[str, str]) -> LocalProcess:
    """Start cmd in its own session; its output goes to root/logs/<name>.log."""
    _dir(cfg).mkdir(parents=True, exist_ok=True)
    pid = spawn(cfg, name, cmd, env=env, pidfile=False)
    line = " ".join(cmd)
    (_dir(cfg) / f"{name}.pid").write_text(f"{pid}\n{line}\n")
    return LocalProcess(name, pid, line)


def listed(cfg: StackConfig) -> list[LocalProcess]:
    """Every process with a pidfile, running or not (a stale pidfile is removed)."""
    found: list[LocalProcess] = []
    for f in sorted(_dir(cfg).glob("*.pid")) if _dir(cfg).is_dir() else []:
        try:
            pid_text, cmd = f.read_text().split("\n", 2)[:2]
            p = LocalProcess(f.stem, int(pid_text), cmd)
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            continue
        if p.running:
            found.append(p)
        else:
            f.unlink(missing_ok=True)
    return found


def stop(cfg: StackConfig, names: Sequence[str] | None = None, *, timeout: float = 30) -> int:
    """SIGTERM (agents finish in-flight work), wait, then SIGKILL. Returns how many stopped."""
    chosen = [p for p in listed(cfg) if names is None or p.name in names]
    signal_all([p.pid for p in chosen], signal.SIGTERM)
    left = wait_gone([p.pid for p in chosen], timeout)
    signal_all(left, signal.SIGKILL)
    if wait_gone(left, 10):
        raise StackError(f"processes {sorted(left)} survived SIGKILL")
    for p in chosen:
        (_dir(cfg) / f"{p.name}.pid").unlink(missing_ok=True)
    return len(chosen)
