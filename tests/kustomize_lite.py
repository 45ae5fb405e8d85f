"""A small kustomize for the features deploy/k8s uses, for machines without kubectl.

`kubectl kustomize` (kustomize v5 inside kubectl) renders the manifests where it is
installed; this renders them where it is not, so the schema validation still runs.
tests/test_deploy_static.py checks that both give the same objects wherever kubectl is
present (ConfigMap hash suffixes aside: kustomize's own hash is not reproduced). Features:
resources (files and folders), namespace, labels (metadata only), images, replicas,
configMapGenerator (envs, literals, behavior merge, disableNameSuffixHash) with the name
references of Deployments and Jobs, and inline JSON 6902 patches targeted by kind, name or
label selector. Anything else in a kustomization.yaml is refused, not ignored.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "replicas",
         "configMapGenerator", "patches"}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def build(folder: Path) -> list[dict[str, Any]]:
    docs, generated = _load(folder)
    return [*_finish(docs, generated)]


def _load(folder: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    k: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN
    if unknown:
        raise ValueError(f"{folder}: kustomize_lite does not know {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    generated: dict[str, dict[str, Any]] = {}  # ConfigMap name -> {data, hash}
    for res in k.get("resources", []):
        path = folder / res
        if path.is_dir():
            sub_docs, sub_gen = _load(path)
            docs += sub_docs
            generated.update(sub_gen)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env_file in gen.get("envs", []):
            for line in (folder / env_file).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = value
        for lit in gen.get("literals", []):
            key, _, value = lit.partition("=")
            data[key] = value
        hashed = not gen.get("options", {}).get("disableNameSuffixHash", False)
        if gen.get("behavior") == "merge":
            entry = generated[gen["name"]]
            entry["data"] = {**entry["data"], **data}
            entry["hashed"] = hashed if "options" in gen else entry["hashed"]
        else:
            generated[gen["name"]] = {"data": data, "hashed": hashed}
    for patch in k.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        for doc in docs:
            if _matches(doc, patch["target"]):
                for op in ops:
                    _apply(doc, op)
    for rep in k.get("replicas", []):
        for doc in docs:
            if doc["metadata"]["name"] == rep["name"] and "replicas" in doc.get("spec", {}):
                doc["spec"]["replicas"] = rep["count"]
    for image in k.get("images", []):
        for doc in docs:
            for c in _containers(doc):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for item in k.get("labels", []):
        if item.get("includeSelectors") or item.get("includeTemplates"):
            raise ValueError("kustomize_lite: labels on selectors/templates not supported")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(item["pairs"])
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
        for entry in generated.values():
            entry["namespace"] = k["namespace"]
    if "labels" in k:
        for entry in generated.values():
            for item in k["labels"]:
                entry.setdefault("labels", {}).update(item["pairs"])
    return docs, generated


def _finish(
    docs: list[dict[str, Any]], generated: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    names = {}
    out = []
    for name, entry in generated.items():
        digest = hashlib.sha256(json.dumps(entry["data"], sort_keys=True).encode()).hexdigest()
        names[name] = f"{name}-{digest[:10]}" if entry["hashed"] else name
        meta: dict[str, Any] = {"name": names[name]}
        if "namespace" in entry:
            meta["namespace"] = entry["namespace"]
        if entry.get("labels"):
            meta["labels"] = entry["labels"]
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                    "data": entry["data"]})  # fmt: skip
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref and ref["configMapRef"]["name"] in names:
                    ref["configMapRef"]["name"] = names[ref["configMapRef"]["name"]]
        for vol in spec.get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] in names:
                vol["configMap"]["name"] = names[vol["configMap"]["name"]]
        out.append(doc)
    return copy.deepcopy(out)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("containers", []), *spec.get("initContainers", [])]


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and doc["metadata"]["name"] != target["name"]:
        return False
    if "labelSelector" in target:
        key, _, value = target["labelSelector"].partition("=")
        return bool(doc["metadata"].get("labels", {}).get(key) == value)
    return True


def _apply(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One JSON 6902 operation (add or replace)."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")]
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if op["op"] == "replace":
        if isinstance(node, list):
            node[int(last)] = op["value"]
        else:
            assert last in node, op["path"]
            node[last] = op["value"]
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        else:
            node[last] = op["value"]
    else:
        raise ValueError(f"kustomize_lite: op {op['op']!r} not supported")
