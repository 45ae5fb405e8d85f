"""The dashboard and the alert rules name only series the code exports.

Scrapes /metrics from a running agent and a running relay (real processes against the local
stack), collects every series name they export (declared families included, so a histogram
nobody observed yet still counts), and fails if a panel of deploy/grafana/dashboards or a
rule of deploy/prometheus/alerts.yml names anything else. It also holds the aggregation
contract: the group-scope gauges, which every replica exports with the same value, are read
through max() and never summed.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agentmesh import devstack
from agentmesh.agents.metrics import GROUP_GAUGES
from tests.conftest import AgentProcess, MeshProcess, eventually

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_OWN = {"up"}  # series Prometheus itself makes for each target
GROUP_SCOPE = {*GROUP_GAUGES, "mesh_outbox_backlog_rows", "mesh_outbox_backlog_oldest_seconds"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "delta", "deriv",
    "histogram_quantile", "min_over_time", "max_over_time", "avg_over_time", "vector",
    "and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
    "group_left", "group_right", "topk", "bottomk", "abs", "clamp_min", "time", "humanize",
    "humanizeDuration", "absent", "label_replace", "scalar", "quantile_over_time",
}  # fmt: skip


def series_in(expr: str) -> set[str]:
    """Metric names an expression reads (labels, strings, functions, durations removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\d+[smhdwy]", " ", e)
    e = re.sub(r"\$\w+", " ", e)  # Grafana variables
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e))
    return {n for n in names if n not in PROMQL_WORDS}


def exported(body: str) -> set[str]:
    """Every series name a /metrics body can carry, from its # TYPE lines and samples."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
        "gauge": ("",),
        "info": ("_info",),
    }
    for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", body, flags=re.M):
        name, kind = kind_line
        if kind == "counter":  # declared as x_total (this client) or x (the standard's)
            name = name.removesuffix("_total")
        names.update(name + s for s in suffixes.get(kind, ("",)))
    names.update(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", body, flags=re.M))
    return names


def dashboard_exprs() -> dict[str, str]:
    out = {}
    for f in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(f.read_text())["panels"]:
            for t in panel.get("targets", []):
                out[f"{f.name}: {panel['title']} [{t['refId']}]"] = t["expr"]
    return out


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return {f"alert {r['alert']}": str(r["expr"]) for g in rules["groups"] for r in g["rules"]}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body.decode()


async def _scrape_when_ready(port: int) -> str:
    async def ready() -> str | None:
        try:
            _get(f"http://127.0.0.1:{port}/readyz")
            body = _get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            return None
        return body

    found: str = await eventually(ready, timeout=60, interval=0.3, what=f"/readyz on {port}")
    return found


def test_the_name_check_catches_a_series_nobody_exports() -> None:
    """The check below is not a rubber stamp: an unknown name and a summed gauge are seen."""
    expr = 'sum by (agent) (rate(mesh_handler_secs_count{agent="x"}[5m])) > 0 and up'
    assert series_in(expr) - PROMETHEUS_OWN == {"mesh_handler_secs_count"}
    assert not _aggregated_by_max("sum by (agent) (mesh_group_lag)", "mesh_group_lag")
    assert _aggregated_by_max("max by (agent, stream) (mesh_group_lag)", "mesh_group_lag")


def _aggregated_by_max(expr: str, name: str) -> bool:
    """Every occurrence of `name` is directly inside max(...) or max by (...) (f(...))."""
    uses = len(re.findall(rf"\b{name}\b", expr))
    wrapped = re.findall(rf"\bmax(?:\s+by\s*\([^)]*\))?\s*\(\s*(?:\w+\(\s*)?{name}\b", expr)
    return uses == len(wrapped)


async def test_dashboard_and_alerts_name_only_exported_series(
    agents: Callable[..., AgentProcess], relays: Callable[..., MeshProcess]
) -> None:
    agent_port, relay_port = devstack.free_port(), devstack.free_port()
    agents("caller", MESH_HTTP_PORT=str(agent_port))
    relays(MESH_HTTP_PORT=str(relay_port))
    agent_body = await _scrape_when_ready(agent_port)
    relay_body = await _scrape_when_ready(relay_port)
    agent_series, relay_series = exported(agent_body), exported(relay_body)
    # both kinds of process carry build info and the standard process metrics
    for series in (agent_series, relay_series):
        assert {"mesh_build_info", "process_cpu_seconds_total",
                "process_resident_memory_bytes", "python_info"} <= series  # fmt: skip
    assert 'component="agent"' in agent_body and 'component="relay"' in relay_body
    known = agent_series | relay_series | PROMETHEUS_OWN
    exprs: dict[str, Any] = {**dashboard_exprs(), **alert_exprs()}
    assert len(exprs) >= 20
    unknown = {where: sorted(series_in(e) - known) for where, e in exprs.items()}
    unknown = {k: v for k, v in unknown.items() if v}
    assert not unknown, f"series the code does not export: {unknown}"
    not_max = [
        (where, name)
        for where, e in exprs.items()
        for name in GROUP_SCOPE
        if re.search(rf"\b{name}\b", e) and not _aggregated_by_max(e, name)
    ]
    assert not not_max, f"group-scope gauges must be aggregated with max(): {not_max}"
    # the panels the issue lists are there
    text = json.dumps(dashboard_exprs())
    for needed in ("mesh_messages_processed_total", "mesh_handler_seconds_bucket",
                   "mesh_group_lag", "mesh_group_pending", "mesh_dlq_depth",
                   "mesh_breaker_state", "mesh_breaker_opened_total",
                   "mesh_outbox_backlog_rows", "mesh_outbox_backlog_oldest_seconds",
                   "mesh_session_seconds_bucket"):  # fmt: skip
        assert needed in text, needed
    alerts = alert_exprs()
    for alert in ("MeshDLQGrowing", "MeshBreakerOpenLong", "MeshRelayBacklogOld",
                  "MeshPendingStuck"):  # fmt: skip
        assert f"alert {alert}" in alerts, alert


def test_grafana_alert_rules_are_the_prometheus_rules() -> None:
    """Grafana's provisioned rules (compose) and alerts.yml (Kubernetes) say the same."""
    path = ROOT / "deploy" / "grafana" / "provisioning" / "alerting" / "agentmesh-alerts.yml"
    grafana = yaml.safe_load(path.read_text())
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    prom = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    graf = {r["title"]: r for g in grafana["groups"] for r in g["rules"]}
    assert set(graf) == set(prom)
    for name, r in prom.items():
        g = graf[name]
        (query,) = [d["model"]["expr"] for d in g["data"] if d["refId"] == "A"]
        assert query == f"({' '.join(str(r['expr']).split())}) * 0 + 1", name
        assert (g["for"], g["labels"], g["annotations"]) == (
            r["for"],
            r["labels"],
            r["annotations"],
        ), name


async def test_group_gauges_and_dlq_depth_are_the_same_in_every_replica(
    agents: Callable[..., AgentProcess], redis: Any
) -> None:
    """Two replicas of one agent type export the same group lag/pending and DLQ depth (so
    max() over replicas is the group's value, and sum() would double it); a forged entry
    dead-lettered shows in mesh_dlq_depth."""
    ports = [devstack.free_port(), devstack.free_port()]
    for port in ports:
        agents("worker", MESH_HTTP_PORT=str(port))
    for _ in range(3):
        await redis.xadd("t:jobs", {"envelope": b"not json"})

    def value(body: str, series: str) -> float | None:
        m = re.search(rf"^{re.escape(series)} (\S+)$", body, flags=re.M)
        return float(m.group(1)) if m else None

    wanted = {
        'mesh_dlq_depth{stream="mesh:dlq"}': 3.0,
        'mesh_group_lag{agent="worker",stream="t:jobs"}': 0.0,
        'mesh_group_pending{agent="worker",stream="t:jobs"}': 0.0,
    }

    async def both_report() -> bool:
        try:
            bodies = [_get(f"http://127.0.0.1:{p}/metrics") for p in ports]
        except OSError:
            return False
        return all(value(b, s) == v for b in bodies for s, v in wanted.items())

    await eventually(both_report, timeout=60, interval=0.5, what="both replicas' gauges")
