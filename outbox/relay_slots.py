"""Partition ownership: which relay publishes which Kafka partition, held by advisory locks.

One writer per partition keeps a session's records in order (and Tansu needs it). The locks
live on a connection kept for them, so a crashed relay's partitions are free at once; a shared
member lock lets live relays count each other and each take a fair share. The partition count
is pinned in mesh_relay_config: relays that disagree on it could own one session at once.
"""

from __future__ import annotations

import math
import random

from agentmesh import connect
from agentmesh.outbox.relay_state import RelayState

SLOT_LOCK_CLASS = 0x6D657372  # "mesr": (class, slot) advisory locks, one per owned slot
MEMBER_LOCK_CLASS = 0x6D65736D  # "mesm": every live relay holds (class, 0) in share mode


class SlotConfigMismatch(RuntimeError):
    pass


class SlotOwnership(RelayState):
    """Taking, counting and giving back slots (`owned`), on the lock connection."""

    async def _check_slot_config(self, partitions: int) -> None:
        assert self.pool is not None
        slots = await self.pool.fetchval(
            """INSERT INTO mesh_relay_config (slots) VALUES ($1)
               ON CONFLICT (id) DO UPDATE SET slots = mesh_relay_config.slots
               RETURNING slots""",
            partitions,
        )
        if slots != partitions:
            raise SlotConfigMismatch(
                f"relays share {slots} partitions but {self.s.audit_topic} has {partitions}; "
                "after changing a topic's partitions, stop every relay, "
                "DELETE FROM mesh_relay_config, then start them again"
            )

    async def _connect_locks(self) -> None:
        """The connection that holds this relay's locks and hears NOTIFY; a half-set-up one
        (its server went away in between) is closed, not left behind."""
        conn = await connect.pg_connect(self.s)
        try:
            if self.member:
                await conn.execute("SELECT pg_advisory_lock_shared($1, 0)", MEMBER_LOCK_CLASS)
            await conn.add_listener("mesh_outbox", lambda *_: self._wake.set())
        except BaseException:
            conn.terminate()
            raise
        self._lock_conn = conn
        self.owned.clear()

    async def rebalance(self) -> None:
        """Take free slots up to a fair share, give back any above it."""
        if not self.slots:
            await self._ensure_producer()
        conn = self._lock_conn
        if conn is None or conn.is_closed():
            self.owned.clear()
            await self._connect_locks()
            conn = self._lock_conn
            assert conn is not None
        self.relays = max(
            1,
            await conn.fetchval(
                """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                   AND classid = $1 AND objid = 0 AND objsubid = 2""",
                MEMBER_LOCK_CLASS,
            ),
        )
        fair = self._fair_share()
        if len(self.owned) > fair:
            for slot in sorted(self.owned)[fair:]:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", SLOT_LOCK_CLASS, slot)
                self.owned.discard(slot)
        elif len(self.owned) < fair:
            order = list(range(self.slots))
            random.shuffle(order)  # relays starting together try different slots first
            for slot in order:
                if len(self.owned) >= fair:
                    break
                if slot in self.owned:
                    continue
                if await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", SLOT_LOCK_CLASS, slot
                ):
                    self.owned.add(slot)
        self.metrics.slots_owned.set(len(self.owned))
        self.metrics.relays.set(self.relays)

    def _fair_share(self) -> int:
        return self.slots if self.drain else math.ceil(self.slots / self.relays)

    def share_missing(self) -> bool:
        return len(self.owned) < self._fair_share()
