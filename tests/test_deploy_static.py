"""Static validation of the deployment files (Docker and a cluster do not run here):
docker-compose.yml through `docker-compose config` (Debian's docker-compose), the Kubernetes
manifests rendered by kustomize and validated against the Kubernetes JSON schemas
(kubernetes-validate) and KEDA's CRD schemas kept in the repository, and the properties the
issue asks of them, each checked on the files themselves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy_files import (
    OVERLAYS,
    ROOT,
    by_kind,
    compose,
    crd_schema,
    mesh_services,
    render,
)

K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests promise to fit
PASSWORDISH = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN)(?!_FILE)", re.I)
DSN_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def _agents_of(module: str) -> dict[str, dict[str, Any]]:
    argv = [".venv/bin/mesh", "agent", "list", "-m", module, "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return {a["name"]: a for a in json.loads(r.stdout)}


# -- docker-compose.yml ---------------------------------------------------------------------
def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose missing: run `make setup` (deploy/install-local-deps.sh)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_SECRETS_DIR"] = str(tmp_path)
    argv = [exe, "-f", str(ROOT / "docker-compose.yml")]
    for profiles in ([], ["--profile", "demo", "--profile", "planner"]):
        r = subprocess.run(
            [*argv, *profiles, "config", "-q"], capture_output=True, text=True, env=env, timeout=60
        )
        assert r.returncode == 0, r.stderr
    # the validator is not a rubber stamp: a misspelt key fails it
    broken = tmp_path / "broken.yml"
    doc = compose()
    doc["services"]["kafka"]["helthcheck"] = doc["services"]["kafka"].pop("healthcheck")
    broken.write_text(yaml.safe_dump(doc))
    r = subprocess.run([exe, "-f", str(broken), "config", "-q"], capture_output=True, env=env)
    assert r.returncode != 0


def test_compose_keeps_the_audit_log_and_waits_for_a_healthy_kafka() -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert any(v.split(":")[1] == log_dirs for v in kafka["volumes"]), "log dir off the volume"
    assert kafka["healthcheck"]["test"][0] == "CMD"
    assert services["relay"]["depends_on"]["kafka"] == {"condition": "service_healthy"}
    for name, svc in mesh_services(compose()).items():
        env = svc["environment"]
        assert env["MESH_KAFKA_IDEMPOTENT_PRODUCER"] == "true", name
        assert env["MESH_KAFKA_TOUCH_PARTITIONS"] == "false", name


def test_compose_holds_no_literal_secret() -> None:
    doc = compose()
    for name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            value = str(value)
            assert not DSN_WITH_PASSWORD.search(value), (name, key)
            if PASSWORDISH.search(key):
                assert value.startswith("/run/secrets/") or "__FILE" in key, (name, key)
        for arg in [*(svc.get("command") or []), *(svc.get("entrypoint") or [])]:
            assert not re.search(r"--requirepass\s+\w", str(arg)), name
    redis = doc["services"]["redis"]
    assert "requirepass" in " ".join(redis["command"]) and "redis_password" in redis["secrets"]
    assert doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"]
    for secret in doc["secrets"].values():
        assert "file" in secret and "MESH_SECRETS_DIR" in secret["file"]
    assert (ROOT / ".env.example").is_file()
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/" in ignored


def test_compose_limits_every_service_and_keeps_the_gateway_ledger() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("memory") and limits.get("cpus"), name
    gateway = services["gateway-standin"]
    assert gateway["profiles"] == ["demo"]
    ledger = gateway["command"][gateway["command"].index("--ledger") + 1]
    assert any(ledger.startswith(v.split(":")[1] + "/") for v in gateway["volumes"])
    assert gateway["environment"]["GATEWAY_HOST"] == "0.0.0.0"


def test_prometheus_scrapes_every_agent_and_relay_service() -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scraped: set[str] = set()
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["port"] == 9100
            scraped.update(sd["names"])
    services = compose()["services"]
    runs = {n for n, s in mesh_services(compose()).items() if s["command"][0] in ("agent", "relay")}
    assert runs <= scraped, runs - scraped
    assert {"prometheus", "grafana"} <= set(services)


# -- Kubernetes -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_and_keda_schemas(target: str) -> None:
    docs = render(target)
    keda = {"ScaledObject", "TriggerAuthentication"}
    for doc in docs:
        if doc["kind"] in keda:
            jsonschema.validate(doc, crd_schema(doc["kind"]))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert not by_kind(docs, "Secret"), "secrets are referenced, never rendered"
    # the validators are not rubber stamps: a misspelt field fails each
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    bad = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**so, "spec": {**so["spec"], "pollingIntervall": 5}}, crd_schema(so["kind"])
        )


def _env(container: dict[str, Any], config: dict[str, str]) -> dict[str, str]:
    return {**config, **{e["name"]: e["value"] for e in container.get("env", [])}}


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_agent_type_has_a_deployment_a_budget_and_a_scaled_object(target: str) -> None:
    docs = render(target)
    (config,) = [d["data"] for d in docs if d["metadata"]["name"].startswith("mesh-config")]
    agents = _agents_of(config["MESH_AGENTS_MODULE"])
    deployments = by_kind(docs, "Deployment")
    scaled = by_kind(docs, "ScaledObject")
    budgets = by_kind(docs, "PodDisruptionBudget")
    for name, agent in agents.items():
        dep = deployments[f"mesh-agent-{name}"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["agent", "run", name]
        env = _env(container, config)
        selector = dep["spec"]["selector"]["matchLabels"]
        assert budgets[f"mesh-agent-{name}"]["spec"]["selector"]["matchLabels"] == selector
        so = scaled[f"mesh-agent-{name}"]["spec"]
        assert so["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        streams = set(agent["consumes"].values())
        lag = {t["metadata"]["stream"]: t for t in so["triggers"] if "lagCount" in t["metadata"]}
        pend = {
            t["metadata"]["stream"]: t
            for t in so["triggers"]
            if "pendingEntriesCount" in t["metadata"]
        }
        assert set(lag) == set(pend) == streams, name
        in_flight = int(env.get("MESH_CONCURRENCY", "200")) * int(env.get("MESH_CONSUMERS", "1"))
        for t in [*lag.values(), *pend.values()]:
            assert t["type"] == "redis-streams" and t["metadata"]["consumerGroup"] == name
            assert t["metadata"]["activationLagCount"] == "0"  # any lag or pending wakes it
            assert t["authenticationRef"]["name"] == "mesh-redis"
        for t in pend.values():  # pending per pod can reach in_flight: no scale-up by itself
            assert int(t["metadata"]["pendingEntriesCount"]) == in_flight, name
        if agent["dependencies"]:
            _check_breaker_formula(name, so, in_flight)


def _expr(formula: str) -> Any:
    """Evaluate KEDA's one-level `cond ? a : b` formula (expr-lang) in Python."""
    m = re.fullmatch(r"\s*(.+?)\s*\?\s*(.+?)\s*:\s*(.+?)\s*", formula)
    assert m, formula
    cond, yes, no = m.groups()
    return lambda **v: eval(f"({yes}) if ({cond}) else ({no})", {"max": max}, v)


def _check_breaker_formula(name: str, so: dict[str, Any], in_flight: int) -> None:
    """Lag scales up while the breaker is closed, not while it is open; pending keeps pods."""
    mod = so["advanced"]["scalingModifiers"]
    assert int(mod["target"]) == in_flight and mod["activationTarget"] == "0"
    names = {t["name"] for t in so["triggers"]}
    assert {"lag", "pending", "breaker"} <= names, names
    breaker = next(t for t in so["triggers"] if t["name"] == "breaker")
    assert f'agent="{name}"' in breaker["metadata"]["query"]
    f = _expr(mod["formula"])
    target = int(mod["target"])
    assert f(breaker=0, lag=10 * target, pending=0) == 10 * target  # wakes and grows on lag
    assert f(breaker=2, lag=10 * target, pending=0) == 0  # open breaker: lag ignored
    assert f(breaker=2, lag=10 * target, pending=3) == 3  # ... but pending keeps a pod
    assert f(breaker=1, lag=10 * target, pending=0) == 10 * target  # half-open: probing


@pytest.mark.parametrize("target", OVERLAYS)
def test_pods_drain_within_their_grace_period_and_run_locked_down(target: str) -> None:
    docs = render(target)
    (config,) = [d["data"] for d in docs if d["metadata"]["name"].startswith("mesh-config")]
    services = by_kind(docs, "Service")
    for dep in by_kind(docs, "Deployment").values():
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = _env(container, config)
        assert pod["terminationGracePeriodSeconds"] > float(env.get("MESH_GRACE_S", "30"))
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert isinstance(pod["securityContext"]["runAsUser"], int)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        labels = pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert any(
            set(s["spec"]["selector"].items()) <= set(pod_labels.items())
            and s["spec"]["ports"][0]["targetPort"] == "metrics"
            for s in services.values()
        ), labels
    (job,) = by_kind(docs, "Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "migrate"]
    assert by_kind(docs, "Deployment")["mesh-relay"]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ] == ["relay", "run"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_manifests_hold_no_literal_secret(target: str) -> None:
    for doc in render(target):
        text = yaml.safe_dump(doc)
        assert not DSN_WITH_PASSWORD.search(text), doc["metadata"]["name"]
        for key, value in (doc.get("data") or {}).items():
            if PASSWORDISH.search(key):
                assert str(value).startswith("/run/secrets/"), (doc["metadata"]["name"], key)
        if doc["kind"] in ("Deployment", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    assert not PASSWORDISH.search(e["name"]) or "valueFrom" in e, e


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl absent: nothing to compare")
@pytest.mark.parametrize("target", OVERLAYS)
def test_the_fallback_renderer_gives_what_kustomize_gives(target: str) -> None:
    """Where kubectl is missing, tests/kustomize_lite.py renders instead: it must agree."""
    from tests.deploy_files import K8S
    from tests.kustomize_lite import build

    def normal(docs: Any) -> dict[str, str]:
        out = {}
        for d in docs:
            text = re.sub(
                r"mesh-config-[a-z0-9]{10}", "mesh-config-H", json.dumps(d, sort_keys=True)
            )
            name = re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])
            out[f"{d['kind']}/{name}"] = text
        return out

    mine, theirs = normal(build(K8S / target)), normal(render(target))
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert mine[key] == theirs[key], key


@pytest.mark.parametrize("target", OVERLAYS)
def test_keda_watches_the_redis_the_agents_use(target: str) -> None:
    """Address, TLS and database of KEDA's triggers agree with MESH_REDIS_URL: a scaler on
    another Redis (or database) would see empty streams and scale the mesh to zero."""
    from urllib.parse import urlsplit

    docs = render(target)
    config = by_kind(docs, "ConfigMap")
    (mesh,) = [d["data"] for n, d in config.items() if n.startswith("mesh-config")]
    keda = config["mesh-keda"]["data"]
    url = urlsplit(mesh["MESH_REDIS_URL"])
    assert keda["redis-address"] == f"{url.hostname}:{url.port or 6379}"
    assert keda["redis-tls"] == ("enable" if url.scheme == "rediss" else "disable")
    db = url.path.strip("/") or "0"
    refs = by_kind(docs, "TriggerAuthentication")["mesh-redis"]["spec"]["configMapTargetRef"]
    assert {r["parameter"] for r in refs} >= {"address", "tls"}
    for so in by_kind(docs, "ScaledObject").values():
        for t in so["spec"]["triggers"]:
            if t["type"] == "redis-streams":
                assert t["metadata"]["databaseIndex"] == db, so["metadata"]["name"]
