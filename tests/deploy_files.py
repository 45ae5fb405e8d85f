"""Reading the deployment files for the tests: the compose file, the rendered Kubernetes
manifests (kustomize), and the KEDA CRD schemas kept in deploy/k8s/schemas/keda."""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMAS = K8S / "schemas" / "keda"
OVERLAYS = ("base", "overlays/example")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def mesh_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the mesh image's `mesh` entry point (agents, relays, migrate)."""
    return {
        n: s for n, s in doc["services"].items() if "build" in s and s.get("entrypoint") is None
    }


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """The manifests of deploy/k8s/<target>, as kustomize renders them (`kubectl kustomize`,
    which embeds kustomize v5), or with tests/kustomize_lite.py where kubectl is missing."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S / target)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    from tests.kustomize_lite import build

    return tuple(build(K8S / target))


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of KEDA's CRD for `kind`, closed: an object whose properties the
    CRD lists rejects other keys (the API server prunes them silently, which hides typos)."""
    for f in KEDA_SCHEMAS.glob("keda.sh_*.yaml"):
        crd = yaml.safe_load(f.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            _close(schema)
            return schema
    raise KeyError(kind)


def _close(node: Any) -> None:
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key != "properties":
                _close(value)
        for value in node.get("properties", {}).values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)
