"""`make bench` cannot rot: bench/targets.py runs end to end with tiny sizes and names every
figure of its table. Nothing here is timed; the figures themselves are not checked."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_targets_runs_and_reports_every_figure() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from targets import FIGURES
    finally:
        sys.path.remove(str(ROOT / "bench"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes() if doc.exists() else None
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "targets.py"), "--messages", "400", "--hops", "6",
         "--warmup", "1", "--relay-rows", "200", "--repeat", "1", "--no-write"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for name in FIGURES:
        line = next((ln for ln in table.splitlines() if ln.startswith(f"| {name}")), None)
        if line is None and "N messages" in name:  # the RSS figure names its N
            line = next((ln for ln in table.splitlines() if "agent RSS after 400" in ln), None)
        assert line is not None, f"figure {name!r} missing:\n{table}"
        assert "not measured" not in line, f"{name}: {line}\n{proc.stderr[-3000:]}"
    assert "CHECK FAILED" not in table, table
    assert (doc.read_bytes() if doc.exists() else None) == before  # --no-write wrote nothing
