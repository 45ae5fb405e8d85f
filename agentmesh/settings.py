"""Settings from environment variables (prefix `MESH_`) or a TOML file (`MESH_CONFIG`,
default ./mesh.toml).

One flat settings object keeps the knobs discoverable: `mesh config` prints them all.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agentmesh import secret_files
from agentmesh.process import redact

#: The settings that hold a secret: SecretStr, redacted everywhere, each also MESH_X_FILE.
SECRET_FIELDS = ("redis_password", "postgres_password", "kafka_sasl_password",
                 "kafka_ssl_key_password")  # fmt: skip


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error would otherwise quote every setting, secrets too
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore", hide_input_in_errors=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6390/0",
        description="redis://, or rediss:// for TLS; keep the password in MESH_REDIS_PASSWORD "
        "(one in the URL works too, and is redacted in output)",
    )
    postgres_dsn: str = Field(
        default="postgresql://mesh@127.0.0.1:5440/mesh",
        description="libpq URL; keep the password in MESH_POSTGRES_PASSWORD (redacted in output)",
    )
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9093", description="host:port[,host:port...] of the Kafka brokers"
    )
    # -- TLS and authentication (agentmesh/connect.py builds every client from these). Every
    # secret X can also come from a file named by MESH_X_FILE (Docker/Kubernetes secrets).
    redis_username: str | None = Field(default=None, description="Redis ACL user (AUTH user pw)")
    redis_password: SecretStr | None = Field(
        default=None, description="Redis password (or MESH_REDIS_PASSWORD_FILE)"
    )
    redis_ssl_ca_file: str | None = Field(
        default=None, description="CA bundle that signed the Redis server's certificate (rediss)"
    )
    redis_ssl_cert_file: str | None = Field(
        default=None, description="client certificate, when Redis has tls-auth-clients yes"
    )
    redis_ssl_key_file: str | None = Field(default=None, description="key of that certificate")
    postgres_password: SecretStr | None = Field(
        default=None, description="PostgreSQL password (or MESH_POSTGRES_PASSWORD_FILE)"
    )
    postgres_sslmode: (
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = Field(default=None, description="libpq sslmode; unset: the DSN's, else prefer")
    postgres_sslrootcert: str | None = Field(
        default=None, description="CA bundle for verify-ca / verify-full"
    )
    postgres_sslcert: str | None = Field(default=None, description="client certificate file")
    postgres_sslkey: str | None = Field(default=None, description="key of that certificate")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="SSL / SASL_SSL encrypt; SASL_* authenticate"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="with SASL_*: how the user authenticates"
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user (or API key)")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password or API secret (or MESH_KAFKA_SASL_PASSWORD_FILE)"
    )
    kafka_ssl_ca_file: str | None = Field(
        default=None, description="CA bundle for the brokers (unset: the system's trust store)"
    )
    kafka_ssl_cert_file: str | None = Field(
        default=None, description="client certificate (mutual TLS, e.g. Aiven)"
    )
    kafka_ssl_key_file: str | None = Field(default=None, description="key of that certificate")
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, description="password of an encrypted key file (or ..._FILE)"
    )

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """MESH_X_FILE names a file holding the secret X (the Docker/Kubernetes convention)."""
        return secret_files.read_into(data, SECRET_FIELDS)

    @model_validator(mode="after")
    def _remember_secrets(self) -> Settings:
        """Whatever prints (logs, CLI errors) redacts the secrets this process holds."""
        redact.remember(
            *(s.get_secret_value() for f in SECRET_FIELDS if (s := getattr(self, f)) is not None),
            *redact.url_passwords(self.redis_url, self.postgres_dsn),
        )
        return self

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
    publish_max_backlog: int = Field(
        default=100_000,
        ge=0,
        description="publishing (Mesh.publish, mesh publish) refuses to take a stream's backlog "
        "(lag + pending of its slowest group) over this; 0 = no bound",
    )
    publish_backlog_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="how long publishing waits for room under the backlog bound before refusing",
    )
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
    kafka_touch_partitions: bool | Literal["auto"] = Field(
        default="auto",
        description="fetch once from each partition before a relay round sends to it: Tansu "
        "restarts a partition at offset 0 if it is produced to before it is read after a broker "
        "restart (overwriting acked records); auto: on unless the broker answers ApiVersions "
        "like Apache Kafka (OffsetForLeaderEpoch, DescribeLogDirs, CreatePartitions)",
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
    relay_lease_s: float = Field(
        default=5.0,
        ge=0.5,
        description="a relay owns a partition for this long after each renewal (every round): "
        "a relay that stops making progress (frozen, hung, cut off from the broker) loses its "
        "partitions to the others after it, whether or not its connection is alive",
    )
    outbox_retention_s: float = Field(
        default=7 * 86400.0, ge=0, description="published outbox rows older than this are pruned"
    )
    outbox_prune_interval_s: float = Field(default=60.0, gt=0)
    projection_batch_size: int = Field(
        default=500, ge=1, description="audit records a projection folds per transaction"
    )
    projection_poll_interval_s: float = Field(
        default=0.5, gt=0, description="how long a projection runner waits for new records"
    )
    projection_rebalance_interval_s: float = Field(
        default=2.0, gt=0, description="how often projection runners re-share the partitions"
    )
    snapshot_every: int = Field(
        default=1000,
        ge=1,
        description="events of a session between two state snapshots "
        "(taken by `mesh projection run mesh_sessions`, used by `mesh replay --state`)",
    )
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
