"""Settings from environment variables (prefix `MESH_`) or a TOML file (`MESH_CONFIG`,
default ./mesh.toml).

One flat settings object keeps the knobs discoverable: `mesh config` prints them all.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6390/0"
    postgres_dsn: str = "postgresql://mesh@127.0.0.1:5440/mesh"
    kafka_bootstrap: str = "127.0.0.1:9093"

    dev_root: str = Field(
        default=".mesh", description="data dir of `mesh dev` (inside the project)"
    )
    dev_s3_port: int = Field(default=4569, description="s3rver port of `mesh dev` (broker storage)")
    agents_module: str | None = Field(
        default=None,
        description="module that defines the agents (required: there is no default)",
    )

    batch_size: int = Field(
        default=200, ge=1, description="most entries per XREADGROUP and per commit"
    )
    block_ms: int = Field(default=1000, ge=1, description="how long one XREADGROUP waits")
    concurrency: int = Field(
        default=600,
        ge=1,
        description="entries in flight (handling or committing) per consumer; well above "
        "batch_size, so the reader keeps reading while a batch commits",
    )
    consumers: int = Field(default=1, ge=1, description="consumer loops per process")
    max_deliveries: int = Field(default=5, ge=1, description="deliveries before an entry is DLQ'd")
    handler_timeout_s: float = Field(
        default=900.0, gt=0, description="one handler run is cancelled after this (a failure)"
    )
    claim_idle_ms: int = Field(
        default=30_000, ge=100, description="idle time after which another consumer reclaims"
    )
    retry_initial_s: float = Field(default=0.5, ge=0, description="first redelivery backoff")
    retry_max_s: float = Field(default=30.0, ge=0, description="largest redelivery backoff")
    grace_s: float = Field(default=30.0, ge=0, description="SIGTERM: time to finish in-flight work")
    trim_interval_s: float = Field(default=30.0, gt=0, description="how often streams are trimmed")
    stream_retention_s: float = Field(
        default=3600.0, ge=0, description="acked entries younger than this are kept for debugging"
    )
    consumer_idle_prune_ms: int = Field(
        default=3_600_000, ge=1000, description="forget consumers idle this long owning nothing"
    )
    dedup_ttl_s: int = Field(default=7 * 86400, ge=1, description="how long XADD dedup keys live")
    dlq_stream: str = "mesh:dlq"
    max_envelope_bytes: int = Field(default=256 * 1024, ge=1024)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9100, ge=0, description="/healthz, /readyz, /metrics; 0 = any")
    pg_pool_size: int = Field(default=4, ge=1)
    audit_topic: str = Field(default="mesh.audit", description="Kafka topic of the audit log")
    kafka_partitions: int = Field(default=12, ge=1, description="partitions of a new audit topic")
    kafka_replication_factor: int = Field(default=1, ge=1, description="replicas of a new topic")
    kafka_retention_ms: int = Field(
        default=-1, ge=-1, description="retention.ms of a new audit topic (-1 = keep forever)"
    )
    kafka_create_topics: bool = Field(
        default=True, description="create the audit topic at relay start-up when missing"
    )
    kafka_idempotent_producer: bool = Field(
        default=False,
        description="Apache Kafka only: enable.idempotence (Tansu does not support it)",
    )
    kafka_touch_partitions: bool = Field(
        default=True,
        description="ask for each partition's offsets before a relay round sends to it: Tansu "
        "restarts a partition at offset 0 if it is produced to before it is read after a broker "
        "restart (overwriting acked records); one cheap request per round, harmless on Kafka",
    )
    kafka_request_timeout_ms: int = Field(default=30_000, ge=1000)
    relay_batch_size: int = Field(default=2000, ge=1, description="outbox rows per relay round")
    relay_poll_interval_s: float = Field(
        default=1.0, gt=0, description="relay poll when no NOTIFY arrives"
    )
    relay_rebalance_interval_s: float = Field(
        default=5.0, gt=0, description="how often relays re-share the partitions"
    )
    relay_retry_max_s: float = Field(
        default=30.0, gt=0, description="largest relay backoff while Kafka is down"
    )
    outbox_retention_s: float = Field(
        default=7 * 86400.0, ge=0, description="published outbox rows older than this are pruned"
    )
    outbox_prune_interval_s: float = Field(default=60.0, gt=0)
    log_format: str = Field(default="console", pattern="^(console|json)$")
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("MESH_CONFIG", "mesh.toml")
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
