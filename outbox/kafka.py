"""Kafka plumbing shared by the relay, replay and republish: clients, the audit topic, the
partition of a session and the record headers.

Only features that both Apache Kafka and Tansu support are used by default: `acks=all`,
explicit per-partition batches, plain fetches. The idempotent producer is opt-in
(`MESH_KAFKA_IDEMPOTENT_PRODUCER`), because Tansu rejects InitProducerId. Every client gets
the connection settings (TLS, SASL) from `agentmesh.connect.kafka_kwargs`.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

from agentmesh.connect import kafka_kwargs
from agentmesh.settings import Settings

#: Largest record batch the relay builds (one envelope is at most 256 KiB by default).
MAX_BATCH_BYTES = 512 * 1024
_TOPIC_ALREADY_EXISTS = 36

#: Header names on every audit record, so consumers can route without parsing the value.
HEADERS = ("event_id", "type", "schema_version", "session_id", "agent", "causation_id")
#: One more header, after those: the outbox row's id (decimal), the record's place in its
#: session's commit order. Replay sorts a session by it, since after a broker lost records
#: (or a republish) Kafka offsets no longer follow that order. Records older relays wrote
#: lack it.
SEQ_HEADER = "mesh-seq"


class TopicSetupError(RuntimeError):
    pass


def producer(s: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **kafka_kwargs(s),
        acks="all",
        enable_idempotence=s.kafka_idempotent_producer,
        max_batch_size=MAX_BATCH_BYTES,
        max_request_size=2 * MAX_BATCH_BYTES,
        request_timeout_ms=s.kafka_request_timeout_ms,
        linger_ms=0,
        client_id="agentmesh-relay",
    )


def consumer(s: Settings) -> AIOKafkaConsumer:
    """A group-less consumer: replay assigns partitions and seeks itself, commits nothing."""
    return AIOKafkaConsumer(
        **kafka_kwargs(s),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=s.kafka_request_timeout_ms,
        client_id="agentmesh-replay",
    )


def probe_consumer(s: Settings) -> AIOKafkaConsumer:
    """A consumer for tiny fetches that only learn each partition's high watermark."""
    return AIOKafkaConsumer(
        **kafka_kwargs(s),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=1024,
        fetch_max_bytes=64 * 1024,
        request_timeout_ms=s.kafka_request_timeout_ms,
        client_id="agentmesh-relay-probe",
    )


async def ensure_topic(s: Settings) -> bool:
    """Create the audit topic with the configured partitions and retention when it is missing.
    Returns True when it was created now."""
    admin = AIOKafkaAdminClient(**kafka_kwargs(s), request_timeout_ms=s.kafka_request_timeout_ms)
    await admin.start()
    try:
        if s.audit_topic in await admin.list_topics():
            return False
        topic = NewTopic(
            s.audit_topic,
            num_partitions=s.kafka_partitions,
            replication_factor=s.kafka_replication_factor,
            topic_configs={"retention.ms": str(s.kafka_retention_ms)},
        )
        resp = await admin.create_topics([topic])
        for name, code, message in resp.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise TopicSetupError(f"cannot create topic {name}: error {code} {message or ''}")
        return all(code == 0 for _, code, _ in resp.topic_errors)
    finally:
        await admin.close()


def session_hash(session_id: str) -> int:
    """murmur2 of the key, positive: what Kafka's default partitioner (and the Java client)
    computes. Stored on every outbox row, so relays can select a partition's rows in SQL."""
    value: int = murmur2(session_id.encode()) & 0x7FFFFFFF
    return value


def partition_of(session_id: str, partitions: Sequence[int]) -> int:
    """The partition Kafka's default partitioner picks for this key, so replay knows where a
    session lives without any index."""
    ordered = sorted(partitions)
    return ordered[session_hash(session_id) % len(ordered)]
