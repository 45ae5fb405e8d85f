"""Partition ownership: which relay publishes which Kafka partition, held by leases that expire.

One writer per partition keeps a session's records in order (and Tansu needs it). A relay owns
a partition for `relay_lease_s` after each renewal, and renews at the start of every round, so
a relay that stops making progress (frozen by SIGSTOP or a GC pause, hung in a send, cut off
from the broker) loses its partitions to the others, whether or not its connection is alive.

- **Epochs fence the late writer.** Every change of owner adds one to the partition's epoch.
  The mark of rows as published checks the epoch in the same statement (relay_rounds), so a
  relay that lost a partition cannot mark there; it does not start a send there either once
  its own clock says the lease ran out (`lease_valid`).
- **Crashes free partitions at once.** Each relay holds an advisory lock (`LIVE_LOCK_CLASS`,
  its token) on its lease connection; a lease whose owner's lock is gone is free at once.
- **Fair shares.** Relays renew a row in mesh_relay_members each round; live members (renewed,
  lock held) share the partitions: ceil(partitions / members) each. A relay whose own rounds
  fail on Kafka does not take expired leases from others (it could not publish them either).
- **Visible.** A takeover is logged once by the relay that takes it, with both names; the
  relay that lost it logs that once too when it wakes.

The partition count is pinned in mesh_relay_config: relays that disagree on it could own one
session at once.
"""

from __future__ import annotations

import math

import asyncpg
import structlog

from agentmesh import connect
from agentmesh.outbox.relay_state import LeaseView, RelayState, lease_clock

log = structlog.get_logger("agentmesh.relay")

LIVE_LOCK_CLASS = 0x6D65736C  # "mesl": (class, token) held by each relay's lease connection

_LIVE = f"""live AS (
    SELECT objid::bigint AS token FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND classid = {LIVE_LOCK_CLASS} AND objsubid = 2
)"""

_JOIN_SQL = """
INSERT INTO mesh_relay_members (topic, token, name, counted, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
ON CONFLICT (topic, token) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""

_MEMBERS_SQL = f"""
WITH {_LIVE},
gone AS (  -- relays that crashed long ago: their lock is gone and their row expired
    DELETE FROM mesh_relay_members
    WHERE topic = $1 AND expires_at < now() - interval '1 minute'
      AND token NOT IN (SELECT token FROM live)
)
SELECT count(*) FROM mesh_relay_members
WHERE topic = $1 AND counted AND expires_at > now() AND token IN (SELECT token FROM live)
"""

_ENSURE_SQL = """
INSERT INTO mesh_relay_leases (topic, kafka_partition)
SELECT $1, p FROM generate_series(0, $2 - 1) AS p
ON CONFLICT DO NOTHING
"""

# Free (given back), owner gone (its liveness lock released: crashed, or its connection lost),
# or expired. `$4`: also expired leases of live owners (only a relay whose Kafka works).
_TAKEABLE_WHERE = """
WHERE topic = $1 AND kafka_partition < $2 AND NOT (kafka_partition = ANY($3::int[]))
  AND (owner_token IS NULL OR owner_token NOT IN (SELECT token FROM live)
       OR ($4 AND expires_at <= now()))
"""

_TAKEABLE_SQL = f"""
WITH {_LIVE}
SELECT kafka_partition, owner, owner_token, epoch,
       EXTRACT(EPOCH FROM now() - expires_at)::float8 AS expired_for,
       (owner_token IS NOT NULL AND owner_token NOT IN (SELECT token FROM live)) AS owner_gone
FROM mesh_relay_leases {_TAKEABLE_WHERE}
ORDER BY random()
LIMIT $5
FOR UPDATE OF mesh_relay_leases SKIP LOCKED
"""

_TAKEABLE_COUNT_SQL = f"WITH {_LIVE} SELECT count(*) FROM mesh_relay_leases {_TAKEABLE_WHERE}"

_TAKE_SQL = """
UPDATE mesh_relay_leases
SET owner = $2, owner_token = $3, epoch = epoch + 1, acquired_at = now(), renewed_at = now(),
    expires_at = now() + make_interval(secs => $4)
WHERE topic = $1 AND kafka_partition = ANY($5::int[])
RETURNING kafka_partition, epoch
"""

# Renews the member row and every lease this relay still holds under its epoch; returns them.
# `$7` (the last round failed on Kafka: no progress): the member row is not renewed (the others
# stop counting this relay, so their fair share grows to take its partitions), and only leases
# that already expired without anyone taking them are renewed: a window for the others.
_RENEW_SQL = """
WITH member AS (
    INSERT INTO mesh_relay_members (topic, token, name, counted, expires_at)
    VALUES ($1, $2, $8, $9, now() + make_interval(secs => $3))
    ON CONFLICT (topic, token) DO UPDATE SET expires_at = EXCLUDED.expires_at WHERE NOT $7
),
renewed AS (
    UPDATE mesh_relay_leases l
    SET renewed_at = now(), expires_at = now() + make_interval(secs => $3),
        progress_at = COALESCE(now() - make_interval(secs => m.ago), l.progress_at)
    FROM unnest($4::int[], $5::bigint[], $6::float8[]) AS m(p, e, ago)
    WHERE l.topic = $1 AND l.owner_token = $2 AND l.kafka_partition = m.p AND l.epoch = m.e
      AND (NOT $7 OR l.expires_at <= now())
    RETURNING l.kafka_partition
)
SELECT l.kafka_partition, l.kafka_partition IN (SELECT kafka_partition FROM renewed) AS renewed
FROM mesh_relay_leases l JOIN unnest($4::int[], $5::bigint[]) AS m(p, e)
  ON l.kafka_partition = m.p AND l.epoch = m.e
WHERE l.topic = $1 AND l.owner_token = $2
"""

_RELEASE_SQL = """
UPDATE mesh_relay_leases
SET owner = NULL, owner_token = NULL, renewed_at = NULL, expires_at = NULL
WHERE topic = $1 AND owner_token = $2 AND kafka_partition = ANY($3::int[])
"""

_VIEW_SQL = """
SELECT kafka_partition, owner, epoch,
       EXTRACT(EPOCH FROM now() - renewed_at)::float8 AS renewed_ago,
       EXTRACT(EPOCH FROM now() - progress_at)::float8 AS progress_ago
FROM mesh_relay_leases WHERE topic = $1 AND kafka_partition < $2 ORDER BY kafka_partition
"""

_OWNERS_SQL = """
SELECT kafka_partition, owner FROM mesh_relay_leases
WHERE topic = $1 AND kafka_partition = ANY($2::int[])
"""


class SlotConfigMismatch(RuntimeError):
    pass


class SlotOwnership(RelayState):
    """Taking, renewing, losing and giving back partitions (`owned`, `epochs`)."""

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
        """The lease connection: it holds this relay's liveness lock and hears NOTIFY. After a
        reconnect the relay keeps what it held: the next renewal says what is still its own.
        A half-set-up connection (its server went away in between) is closed, not left."""
        conn = await connect.pg_connect(self.s)
        try:
            while not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", LIVE_LOCK_CLASS, self.token
            ):  # another relay drew the same token: its leases are not ours
                self._drop(set(self.owned))
                self.token = (self.token % (2**31 - 1)) + 1
            await conn.execute(
                _JOIN_SQL, self.s.audit_topic, self.token, self.name, self.member,
                self.s.relay_lease_s,
            )  # fmt: skip
            await conn.add_listener("mesh_outbox", lambda *_: self._wake.set())
        except BaseException:
            conn.terminate()
            raise
        self._lease_conn = conn

    async def _conn(self) -> asyncpg.Connection:
        conn = self._lease_conn
        if conn is None or conn.is_closed():
            self._lease_conn = None
            # the liveness lock went with the old connection: another relay may hold these
            # partitions already, so nothing is sent there before a renewal says otherwise
            self._until.clear()
            await self._connect_locks()
            conn = self._lease_conn
            assert conn is not None
        return conn

    async def renew(self) -> None:
        """At the start of every round: renew the leases still held under their epoch, note
        the ones another relay took meanwhile. A renewal counts from before it was asked for."""
        conn = await self._conn()
        parts = sorted(self.owned)
        now = lease_clock()
        ago = [now - self._progress[p] if p in self._progress else None for p in parts]
        recs = await conn.fetch(
            _RENEW_SQL, self.s.audit_topic, self.token, self.s.relay_lease_s, parts,
            [self.epochs[p] for p in parts], ago, self.kafka_failing, self.name, self.member,
        )  # fmt: skip
        until = now + self.s.relay_lease_s - self._lease_margin()
        held = set()
        for r in recs:
            p = r["kafka_partition"]
            held.add(p)
            if r["renewed"]:
                self._until[p] = until
                self._renewed[p] = now
        if lost := self.owned - held:
            await self._lost_leases(lost, "its lease expired while this relay made no progress")

    async def _lost_leases(self, partitions: set[int], why: str) -> None:
        """Partitions another relay holds now (a renewal or a mark found a newer epoch):
        nothing more is sent or marked there. Logged once, with the new owner's name."""
        owners: dict[int, str | None] = {}
        try:
            conn = await self._conn()
            for r in await conn.fetch(_OWNERS_SQL, self.s.audit_topic, sorted(partitions)):
                owners[r["kafka_partition"]] = r["owner"]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # the names are for the log line only
        for p in sorted(partitions):
            log.warning(
                "relay: lost a partition to another relay; nothing more is sent or marked there",
                partition=p, relay=self.name, now_owned_by=owners.get(p), why=why,
                epoch=self.epochs.get(p),
            )  # fmt: skip
        self.metrics.leases_lost.inc(len(partitions))
        self._drop(partitions)

    def _drop(self, partitions: set[int]) -> None:
        for p in partitions:
            self.owned.discard(p)
            self.epochs.pop(p, None)
            self._until.pop(p, None)
            self._renewed.pop(p, None)
            self._progress.pop(p, None)
        self.metrics.slots_owned.set(len(self.owned))

    async def rebalance(self) -> None:
        """Take free, orphaned or expired partitions up to a fair share; give back any above
        it (the caller has settled the marks first)."""
        if not self.slots:
            await self._ensure_producer()
        conn = await self._conn()
        topic = self.s.audit_topic
        if not self.kafka_failing:  # a relay that cannot publish stops counting
            await conn.execute(_JOIN_SQL, topic, self.token, self.name, self.member,
                               self.s.relay_lease_s)  # fmt: skip
        self.relays = max(1, await conn.fetchval(_MEMBERS_SQL, topic))
        fair = self._fair_share()
        if len(self.owned) > fair:
            back = sorted(self.owned)[fair:]
            await conn.execute(_RELEASE_SQL, topic, self.token, back)
            self._drop(set(back))
        elif len(self.owned) < fair:
            await self._take(conn, fair - len(self.owned))
        await self._read_view(conn)
        self.metrics.slots_owned.set(len(self.owned))
        self.metrics.relays.set(self.relays)

    async def _take(self, conn: asyncpg.Connection, n: int) -> None:
        topic = self.s.audit_topic
        await conn.execute(_ENSURE_SQL, topic, self.slots)
        started = lease_clock()
        async with conn.transaction():
            cands = await conn.fetch(
                _TAKEABLE_SQL, topic, self.slots, sorted(self.owned),
                not self.kafka_failing and self.kafka_ok, n,
            )  # fmt: skip
            if not cands:
                return
            taken = await conn.fetch(
                _TAKE_SQL, topic, self.name, self.token, self.s.relay_lease_s,
                [c["kafka_partition"] for c in cands],
            )  # fmt: skip
        until = started + self.s.relay_lease_s - self._lease_margin()
        for r in taken:
            p = r["kafka_partition"]
            self.owned.add(p)
            self.epochs[p] = r["epoch"]
            self._until[p] = until
            self._renewed[p] = started
        for c in cands:
            if c["owner_token"] is None or c["owner_token"] == self.token:
                continue  # given back, or never owned: not a takeover
            self.metrics.takeovers.inc()
            log.warning(
                "relay: took over a partition from another relay",
                partition=c["kafka_partition"], from_relay=c["owner"], to_relay=self.name,
                why="its relay is gone" if c["owner_gone"] else
                f"its lease expired {max(0.0, c['expired_for'] or 0.0):.1f} s ago",
                epoch=c["epoch"] + 1,
            )  # fmt: skip

    async def _read_view(self, conn: asyncpg.Connection) -> None:
        """Every partition's lease, for /metrics (owner, lease age, last progress)."""
        now = lease_clock()
        self.leases = [
            LeaseView(r["kafka_partition"], r["owner"], r["epoch"], r["renewed_ago"],
                      r["progress_ago"], now)
            for r in await conn.fetch(_VIEW_SQL, self.s.audit_topic, self.slots)
        ]  # fmt: skip

    async def release_all(self) -> None:
        """Give every partition back (a clean stop): the others take them at once."""
        conn = self._lease_conn
        if conn is None or conn.is_closed() or not self.owned:
            return
        await conn.execute(_RELEASE_SQL, self.s.audit_topic, self.token, sorted(self.owned))
        self._drop(set(self.owned))

    def _fair_share(self) -> int:
        return self.slots if self.drain else math.ceil(self.slots / self.relays)

    def share_missing(self) -> bool:
        return len(self.owned) < self._fair_share()

    async def takeover_due(self) -> bool:
        """Below a fair share, with a partition free, orphaned or (when this relay's Kafka
        works) expired: worth a rebalance now rather than at the next interval."""
        if not self.slots:
            return False
        conn = await self._conn()
        self.relays = max(1, await conn.fetchval(_MEMBERS_SQL, self.s.audit_topic))
        await self._read_view(conn)
        if not self.share_missing():
            return False
        expired = not self.kafka_failing and self.kafka_ok
        n = await conn.fetchval(
            _TAKEABLE_COUNT_SQL, self.s.audit_topic, self.slots, sorted(self.owned), expired
        )
        return bool(n)
