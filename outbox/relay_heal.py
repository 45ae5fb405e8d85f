"""Healing the audit log after the broker lost records it had acknowledged.

The sign: an ack at an offset not above one acked before in the same partition (relay_kafka
notes it in `_lost`). Every record from that offset on is gone then: overwritten, or never
kept. The relay puts it right by itself, in the transaction of the mark that follows, before
that mark:

- every row marked published in that partition of the topic at or after the lost offset is
  marked unpublished again (`published_at = NULL`), so the relay's normal path sends it again,
  in id order (rows acked in the same round at or after that offset are simply not marked);
- the replay index (`mesh_audit_index`) forgets its ranges from that offset on (a range that
  started before it now ends just before it), so replay does not seek to records that are
  gone, and the copies sent again get ranges of their own;
- a `mesh.operator` event (operator `relay:<name>`, action `audit.heal`, filed under the
  session `operator`, like other actions on many sessions) records what was lost and re-sent.

After the commit, `mesh_relay_healed_rows_total` counts the rows and one error line is logged.

A loss is also found without any new traffic: an idle relay compares, every rebalance interval,
each owned partition's end offset (fetched) with the highest offset acked there; an end at or
below it means the records from the end on are gone (`_check_ends`). So a partition nobody
writes to any more heals too, within seconds, not at its next record.

What the relay knows of a partition's offsets (`_high`) is what it was acked itself; for a
slot it has just taken, it is looked up in the index (the highest offset any relay recorded
there), so a relay restarted together with the broker notices a loss as well. An ack below an
out-of-date `_high` (another relay already healed the partition) finds nothing recorded at or
after it: then nothing was lost, and nothing is re-sent or recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg
import structlog

from agentmesh.outbox.operator import record_operator_action
from agentmesh.outbox.relay_state import Lost, RelayState

log = structlog.get_logger("agentmesh.relay")

#: An idle check does not heal a partition again this soon after it healed it.
IDLE_HEAL_QUIET_S = 60.0

#: The `action` of the `mesh.operator` event a heal writes.
HEAL_ACTION = "audit.heal"

_HIGH_SQL = """
SELECT kafka_partition, max(last_offset) AS high FROM mesh_audit_index
WHERE topic = $1 AND kafka_partition = ANY($2::int[])
GROUP BY kafka_partition
"""

_HELD_SQL = """
SELECT 1 FROM mesh_relay_leases
WHERE topic = $1 AND kafka_partition = $2 AND owner_token = $3 AND epoch = $4
FOR KEY SHARE
"""

_HEAL_SQL = """
WITH healed AS (
    UPDATE mesh_outbox SET published_at = NULL
    WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset >= $3
      AND published_at IS NOT NULL
    RETURNING session_id, kafka_offset
),
gone AS (
    DELETE FROM mesh_audit_index
    WHERE topic = $1 AND kafka_partition = $2 AND first_offset >= $3
    RETURNING session_id
),
cut AS (
    UPDATE mesh_audit_index ix
    SET last_offset = $3 - 1, updated_at = now(),
        records = GREATEST(1, ix.records - (SELECT count(*) FROM healed h
                                            WHERE h.session_id = ix.session_id
                                              AND h.kafka_offset <= ix.last_offset))
    WHERE ix.topic = $1 AND ix.kafka_partition = $2 AND ix.first_offset < $3
      AND ix.last_offset >= $3
    RETURNING ix.session_id
)
SELECT (SELECT count(*) FROM healed) AS rows,
       (SELECT count(*) FROM gone) + (SELECT count(*) FROM cut) AS ranges,
       (SELECT count(DISTINCT session_id) FROM (
            SELECT session_id FROM healed UNION ALL SELECT session_id FROM gone
            UNION ALL SELECT session_id FROM cut) s) AS sessions
"""


@dataclass(frozen=True)
class Healed:
    """One partition's heal, as committed."""

    partition: int
    lost: Lost
    rows: int  # rows that were marked published there, marked unpublished again
    ranges: int  # index ranges dropped or cut short
    sessions: int
    event_id: str | None  # the audit event, when something was lost

    @property
    def resent(self) -> int:
        """Rows going to Kafka again: the ones marked before, and the round's own."""
        return self.rows + self.lost.dropped

    @property
    def anything_lost(self) -> bool:
        return bool(self.rows or self.ranges or self.lost.dropped)


class Healing(RelayState):
    """`_know_high` before a round sends, `_heal` in its mark's transaction, `_healed` after."""

    def _forget_given_back(self) -> None:
        """Slots given back since the last round may be written by another relay now: what
        this one knew of their offsets is dropped (looked up again if it takes them back), and
        so is a loss it had not healed yet (the new owner finds it through the index)."""
        if self.owned == self._high_owned:
            return
        self._high_known &= self.owned
        for p in [p for p in self._lost if p not in self.owned]:
            del self._lost[p]
        self._high_owned = set(self.owned)

    async def _know_high(self, partitions: list[int]) -> None:
        """For partitions not looked up since this relay took them: the highest offset the
        index recorded there, so that a loss the broker had before is noticed too."""
        unknown = [p for p in partitions if p not in self._high_known]
        if not unknown:
            return
        assert self.pool is not None
        recs = await self.pool.fetch(_HIGH_SQL, self.s.audit_topic, unknown)
        for p in unknown:
            self._high.pop(p, None)
        for r in recs:
            self._high[r["kafka_partition"]] = r["high"]
        self._high_known.update(unknown)

    async def _check_ends(self) -> None:
        """When idle, at most every rebalance interval: note a loss in every owned partition
        whose end offset is at or below the highest offset acked there."""
        now = time.monotonic()
        if not self.owned or now - self._ends_checked < self.s.relay_rebalance_interval_s:
            return
        self._ends_checked = now
        owned = sorted(self.owned)
        await self._know_high(owned)
        known = [p for p in owned if p in self._high and p not in self._lost]
        if not known:
            return
        for p, end in (await self._ends(known)).items():
            high = self._high.get(p)
            if high is None or end > high:
                continue
            if now - self._idle_healed.get(p, -IDLE_HEAL_QUIET_S) < IDLE_HEAL_QUIET_S:
                # healed idle moments ago and the end is still behind: a broker whose end
                # offset lags its records; never re-send the same rows in a loop over it
                log.warning(
                    "relay: partition end still behind what was acked after a heal",
                    topic=self.s.audit_topic,
                    partition=p,
                    end=end,
                    acked_up_to=high,
                )
                continue
            self._idle_healed[p] = now
            self.metrics.offset_regressions.inc()
            self._note_lost(p, end, high, dropped=0)

    async def _heal(self, conn: asyncpg.Connection) -> list[Healed]:
        """In the mark's transaction, before the mark: for each partition in `_lost`, mark the
        rows acked at or after the lost offset unpublished, trim the index, record the event."""
        out: list[Healed] = []
        topic = self.s.audit_topic
        for p, lost in sorted(self._lost.items()):
            epoch = self.epochs.get(p)
            if epoch is None or not await conn.fetchval(_HELD_SQL, topic, p, self.token, epoch):
                # fenced: another relay holds the partition now and finds the loss itself
                out.append(Healed(p, Lost(lost.offset, lost.previous), 0, 0, 0, None))
                continue
            r = await conn.fetchrow(_HEAL_SQL, topic, p, lost.offset)
            assert r is not None
            rows, ranges, sessions = int(r["rows"]), int(r["ranges"]), int(r["sessions"])
            event_id = None
            if rows or ranges or lost.dropped:
                env = await record_operator_action(
                    conn,
                    operator=f"relay:{self.name}",
                    action=HEAL_ACTION,
                    reason=(
                        f"the broker handed out offset {lost.offset} of {topic}[{p}] again after "
                        f"acking up to {lost.previous}: the records from {lost.offset} on were "
                        "lost; the relay sends the outbox rows it had acked there again"
                    ),
                    target=f"{topic}[{p}] offsets {lost.offset}..{lost.previous}",
                    session_id=None,  # many sessions: filed under the operator's own
                    detail={
                        "topic": topic,
                        "partition": p,
                        "lost_from": lost.offset,
                        "acked_up_to": lost.previous,
                        "rows": rows + lost.dropped,
                        "sessions": sessions,
                        "index_ranges": ranges,
                    },
                )  # its INSERT also NOTIFYs mesh_outbox at commit: the relays wake at once
                event_id = env.event_id
            out.append(Healed(p, lost, rows, ranges, sessions, event_id))
        return out

    def _healed(self, healed: list[Healed]) -> None:
        """After the commit: forget the losses, count the rows, say it once. What this relay
        knows was acked there now ends before the lost offset: the next ack lands above it,
        and is not taken for another loss."""
        for h in healed:
            self._lost.pop(h.partition, None)
            self._high[h.partition] = min(self._high.get(h.partition, -1), h.lost.offset - 1)
            if not h.anything_lost:
                log.info(
                    "relay: an ack below an offset seen before, but nothing recorded there was "
                    "lost (the partition was healed by another relay)",
                    topic=self.s.audit_topic,
                    partition=h.partition,
                    offset=h.lost.offset,
                    previous=h.lost.previous,
                )
                continue
            self.metrics.healed_rows.inc(h.resent)
            log.error(
                "relay: the broker lost records it had acknowledged (it handed out an offset "
                "again); the outbox rows acked there are being sent again, no action needed",
                topic=self.s.audit_topic,
                partition=h.partition,
                lost_from=h.lost.offset,
                acked_up_to=h.lost.previous,
                rows=h.resent,
                sessions=h.sessions,
                audit_event=h.event_id,
            )
