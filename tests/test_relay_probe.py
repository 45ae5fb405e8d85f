"""The partition probe (`kafka_touch_partitions`) follows the broker: on for Tansu, whose
restart bug it guards against, off for Apache Kafka, where it would only cost a fetch a round."""

from __future__ import annotations

import asyncpg

from agentmesh.outbox.relay import Relay
from agentmesh.outbox.relay_kafka import needs_probe
from tests.audit_helpers import settings_from

# ApiVersions keys as Tansu 0.6 answers them (read from the test stack's broker)
TANSU = {0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 24, 25, 26, 28,
         29, 30, 32, 36, 42, 44, 46, 50, 51, 60, 69, 71, 75}  # fmt: skip
# ... and as an Apache Kafka 3.x broker does (keys 0-68 less the controller-only ones)
KAFKA = set(range(0, 69)) - {4, 5, 6, 7, 52, 53, 54, 55, 56, 58, 59, 62, 63, 64, 67}


def test_auto_probes_every_broker_that_does_not_answer_like_apache_kafka() -> None:
    assert needs_probe(TANSU)
    assert not needs_probe(KAFKA)
    assert needs_probe(set())  # an empty or odd answer: probe (it costs one fetch)


async def test_auto_turns_the_probe_on_for_the_stacks_tansu_and_settings_still_decide(
    pg: asyncpg.Connection, audit_env: dict[str, str]
) -> None:
    for setting, expected in (("auto", True), ("false", False), ("true", True)):
        relay = Relay(settings_from(audit_env, kafka_touch_partitions=setting))
        await relay.start()
        try:
            await relay.prepare()
            assert relay.touching is expected, setting
            assert (relay._probe is not None) is expected
        finally:
            await relay.close()
