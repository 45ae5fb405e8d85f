"""`python -m agentmesh …` processes for the benchmarks: started with their own log files,
checked for early exits, always stopped on the way out."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


class MeshProcs:
    def __init__(
        self, argv: list[str], name: str, n: int, env: dict[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.logs = [log_dir / f"{name}-{i}.log" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for path in self.logs:
            with path.open("wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "agentmesh", *argv],
                        env=env,
                        cwd=log_dir,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )

    def check_alive(self) -> None:
        for p, path in zip(self.procs, self.logs, strict=True):
            if p.poll() is not None:
                tail = path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} process exited with {p.returncode}:\n{tail}")

    def stop(self, timeout: float = 20) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
