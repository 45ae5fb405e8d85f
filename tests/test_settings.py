"""Settings: defaults, a TOML file, environment variables winning over the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agentmesh.settings import load_settings


def test_toml_file_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MESH_BATCH_SIZE", "MESH_MAX_DELIVERIES", "MESH_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    cfg = tmp_path / "mesh.toml"
    cfg.write_text('batch_size = 50\nmax_deliveries = 9\nredis_url = "redis://r:1/0"\n')
    monkeypatch.setenv("MESH_CONFIG", str(cfg))
    monkeypatch.setenv("MESH_MAX_DELIVERIES", "3")
    s = load_settings()
    assert (s.batch_size, s.max_deliveries, s.redis_url) == (50, 3, "redis://r:1/0")


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_CONFIG", "/nonexistent.toml")
    monkeypatch.setenv("MESH_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        load_settings()
