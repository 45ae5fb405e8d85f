"""The relay's Kafka link: producer and partition probe, and the in-order send per partition.

The clients are connected lazily and rebuilt after an outage (the broker may come back as a new
process, the topic may need setting up again). Each partition gets one record batch in flight
at a time and stops at its first failure, so nothing overtakes a record Kafka did not ack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.protocol.admin import ApiVersionRequest

from agentmesh.outbox import kafka
from agentmesh.outbox.relay_slots import SlotConfigMismatch
from agentmesh.outbox.relay_state import RelayState, Row, Sent

log = structlog.get_logger("agentmesh.relay")


class KafkaUnavailable(RuntimeError):
    """Kafka did not answer. (Not an OSError, unlike TimeoutError: that would be taken for a
    Postgres outage, and the Kafka clients would not be rebuilt.)"""


class KafkaLink(RelayState):
    """The producer, the probe consumer and the partitions they were set up for."""

    async def _ensure_producer(self) -> AIOKafkaProducer:
        try:
            return await self._connect_kafka()
        except OSError as exc:  # asyncio timeouts and socket errors from the Kafka clients
            raise KafkaUnavailable(_describe(exc)) from exc

    async def _connect_kafka(self) -> AIOKafkaProducer:
        if self._producer is None:
            if self.s.kafka_create_topics:
                await kafka.ensure_topic(self.s)
            p = kafka.producer(self.s)
            try:
                await p.start()
            except Exception:
                await _stop_quietly(p)
                raise
            self._producer = p
            self.touching = await self._needs_probe(p)
        if self.touching and self._probe is None:
            self._probe = await self._start_probe()
        if not self._partitions:
            parts = sorted(await self._producer.partitions_for(self.s.audit_topic))
            if parts != list(range(len(parts))):
                raise SlotConfigMismatch(f"{self.s.audit_topic} has partitions {parts}")
            if self.slots != len(parts):
                await self._check_slot_config(len(parts))
                self.slots = len(parts)
            self._partitions = parts
        return self._producer

    async def _needs_probe(self, producer: AIOKafkaProducer) -> bool:
        """Settings.kafka_touch_partitions, with "auto" decided by asking the broker which
        APIs it serves (one request per new producer): Apache Kafka needs no probe."""
        setting = self.s.kafka_touch_partitions
        if setting != "auto":
            return bool(setting)
        try:
            node = next(iter(producer.client.cluster.brokers())).nodeId
            resp = await producer.client.send(node, ApiVersionRequest())
            keys = {int(v[0]) for v in resp.api_versions}
        except Exception as exc:  # unsure: probe, it costs one fetch per round
            if self.member:
                log.info("relay: partition probe on (ApiVersions failed)", error=_describe(exc))
            return True
        touching = needs_probe(keys)
        if touching != self.touching and self.member:  # not from one-shot commands' output
            log.info(
                "relay: partition probe " + ("on (the broker is not Apache Kafka)" if touching
                                             else "off (the broker is Apache Kafka)"),
            )  # fmt: skip
        return touching

    async def _start_probe(self) -> AIOKafkaConsumer:
        probe = kafka.probe_consumer(self.s)
        try:
            await probe.start()
        except Exception:
            await _stop_quietly(probe)
            raise
        return probe

    async def _reset_producer(self) -> None:
        p, self._producer, self._partitions = self._producer, None, []
        probe, self._probe = self._probe, None
        for client in (p, probe):
            if client is not None:
                await _stop_quietly(client)

    async def _touch(self, probe: AIOKafkaConsumer, partitions: list[int]) -> None:
        """Fetch from each partition before producing to it (Settings.kafka_touch_partitions).

        Tansu restarts a partition at offset 0, overwriting acked records, when it is produced
        to before anything fetched from it since the broker started; a fetch makes it load its
        high watermark. ListOffsets does not. On Apache Kafka "auto" turns it off."""
        try:
            await self._fetch_once(probe, partitions)
        except OSError as exc:
            raise KafkaUnavailable(_describe(exc)) from exc

    async def _ends(self, partitions: list[int]) -> dict[int, int]:
        """Each partition's end offset, from a fetch (on Tansu, ListOffsets may answer before
        the partition is loaded; a fetch is what loads it). The probe is started if needed."""
        await self._ensure_producer()
        if self._probe is None:
            self._probe = await self._start_probe()
        try:
            return await self._fetch_once(self._probe, partitions)
        except OSError as exc:
            raise KafkaUnavailable(_describe(exc)) from exc

    async def _fetch_once(self, probe: AIOKafkaConsumer, partitions: list[int]) -> dict[int, int]:
        """Fetch once from each partition; their high watermarks."""
        tps = [TopicPartition(self.s.audit_topic, p) for p in partitions]
        probe.assign(tps)
        for tp in tps:
            probe.seek(tp, max(0, self._high.get(tp.partition, 0)))
        deadline = time.monotonic() + self.s.kafka_request_timeout_ms / 1000
        try:
            while any(probe.highwater(tp) is None for tp in tps):
                if time.monotonic() > deadline:
                    raise KafkaUnavailable("no fetch answer from Kafka for the partition probe")
                await probe.getmany(*tps, timeout_ms=5, max_records=1)
            return {tp.partition: int(probe.highwater(tp) or 0) for tp in tps}
        finally:
            probe.unsubscribe()  # no background fetching between rounds

    async def _send_partition(
        self, producer: AIOKafkaProducer, partition: int, rows: Sequence[Row]
    ) -> Sent:
        """Send rows as consecutive record batches, each after the previous one's ack; stop at
        the first failure. Returns the acked prefix with offsets, and the error if any.

        Fencing: no batch is handed to the producer once this relay's lease on the partition
        ran out by its own clock (`lease_valid`); the send stops there, `fenced`. What it had
        handed over before (at most the one batch in flight) may still land: a duplicate with
        the same event ids, which the new owner sends too, and whose mark is refused.

        An ack at an offset not above one acked before means the broker lost the records from
        that offset on. The rows this send had acked there are dropped from the result (they
        stay unpublished, so they go again), the loss is noted in `_lost` for the heal that
        runs before the round's mark (relay_heal), and the partition stops for this round:
        what follows goes next round, in id order with the rows the heal re-sends."""
        sent = Sent(partition, [])
        last = self._high.get(partition, -1)
        epoch = self.epochs.get(partition, 0)
        i = 0
        regressed = False
        while i < len(rows) and not regressed:
            batch = producer.create_batch()
            chunk: list[Row] = []
            while i < len(rows):
                row = rows[i]
                meta = batch.append(
                    key=row.session_id.encode(),
                    value=row.envelope.encode(),
                    timestamp=None,
                    headers=row.headers(epoch),
                )
                if meta is None:
                    if not chunk:
                        raise ValueError(f"outbox row {row.id} does not fit in one record batch")
                    break
                chunk.append(row)
                i += 1
            batch.close()
            if not self.lease_valid(partition):
                self.metrics.fenced_sends.inc()
                sent.fenced = True
                return sent
            try:
                fut = await producer.send_batch(batch, self.s.audit_topic, partition=partition)
                meta = await fut
            except Exception as exc:
                self.metrics.send_failures.inc()
                sent.error = f"{type(exc).__name__}: {exc}"
                return sent
            if meta.offset <= last:
                regressed = True
                self.metrics.offset_regressions.inc()
                kept = [(row, off) for row, off in sent.acked if off < meta.offset]
                self._note_lost(partition, meta.offset, last, dropped=len(sent.acked) - len(kept))
                sent.acked = kept
            last = meta.offset + len(chunk) - 1
            self._high[partition] = last
            sent.acked.extend((row, meta.offset + k) for k, row in enumerate(chunk))
        return sent


#: APIs every Apache Kafka broker since 1.0 serves (OffsetForLeaderEpoch, DescribeLogDirs,
#: CreatePartitions); Tansu serves none of them.
KAFKA_APIS = frozenset({23, 35, 37})


def needs_probe(api_keys: set[int]) -> bool:
    """Whether a broker serving `api_keys` (its ApiVersions answer) gets the partition probe:
    every broker that does not answer like Apache Kafka does (Tansu's restart bug)."""
    return not KAFKA_APIS <= api_keys


async def _stop_quietly(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Stop a client whose broker may be gone. aiokafka can raise the broker error, or the
    CancelledError of its own internal tasks, from stop(); neither may end the relay. A
    cancellation of the relay itself still propagates."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:
        pass


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
