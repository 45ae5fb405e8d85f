"""What every process exports besides its own series: `mesh_build_info` and the standard
process metrics (`process_*`, `python_info`, `python_gc_*`).

Each agent and relay serves its own CollectorRegistry (not the global one), so the standard
collectors prometheus_client puts on the global registry are not there unless added: this
adds them, once per registry. The image sets MESH_BUILD_REVISION (the git commit it was
built from); the version is the installed distribution's.
"""

from __future__ import annotations

import os
import platform

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

from agentmesh._version import __version__


def register_process_metrics(registry: CollectorRegistry, component: str) -> None:
    """Add build info (component = "agent" or "relay") and the standard process collectors."""
    info = Gauge(
        "mesh_build_info",
        "Always 1; the labels say which build runs (version, git revision, Python, component)",
        ["version", "revision", "python", "component"],
        registry=registry,
    )
    revision = os.environ.get("MESH_BUILD_REVISION", "unknown")
    info.labels(__version__, revision, platform.python_version(), component).set(1)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
