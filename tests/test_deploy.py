"""The deployment files agree with the code: every agent service of docker-compose.yml runs an
agent its module defines, with the environment it needs. (Docker does not run here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _agents_of(module: str) -> set[str]:
    """The agents `mesh agent list` finds in module, in a fresh process (no test agents)."""
    argv = [sys.executable, "-m", "agentmesh", "agent", "list", "-m", module, "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}  # as the demo image sets it
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return {a["name"] for a in json.loads(r.stdout)}


def test_every_compose_agent_service_runs_an_agent_of_its_module() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    seen: set[str] = set()
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if cmd[:2] != ["agent", "run"]:
            continue
        env = svc["environment"]
        assert cmd[2] in _agents_of(env["MESH_AGENTS_MODULE"]), (name, cmd)
        for key in ("MESH_REDIS_URL", "MESH_POSTGRES_DSN", "MESH_KAFKA_BOOTSTRAP"):
            assert env.get(key), (name, key)
        seen.add(cmd[2])
    assert {"intake", "risk", "payments", "notifier"} <= seen
    assert services["payments"]["deploy"]["replicas"] == 2
    assert services["relay"]["command"] == ["relay", "run"]
    gateway = services["gateway-standin"]
    assert gateway["environment"]["GATEWAY_HOST"] == "0.0.0.0"  # reachable from payments
    assert "--port" in gateway["command"]
    port = gateway["command"][gateway["command"].index("--port") + 1]
    assert (
        f"http://gateway-standin:{port}"
        in services["payments"]["environment"]["REFUND_GATEWAY_URL"]
    )


def test_the_image_copies_every_package_the_project_ships() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    runtime, demo = dockerfile.split("FROM runtime AS demo")
    for package in ("agentmesh", "agents", "bus", "outbox", "schemas"):
        assert f"COPY {package} ./{package}" in runtime, package
    assert "COPY examples" not in runtime  # the runtime image ships no example agents
    for example in ("refund_desk", "planner_writer"):
        assert f"examples/{example} /app/examples/{example}" in demo, example
    assert "PYTHONPATH=/app/examples" in demo
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        if "build" in svc:  # the compose file runs the example desk: the demo image
            assert svc["build"]["target"] == "demo", name
