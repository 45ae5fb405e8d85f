-- Relay partition ownership by leases that expire, instead of advisory locks that live as long
-- as their connection: a relay frozen (SIGSTOP, a GC pause, a hung send) with its connection
-- still open loses its partitions once it stops renewing (outbox/relay_slots.py).

-- One row per partition of the audit topic. A relay owns a partition while its lease is
-- renewed; `epoch` goes up by one every time the partition changes hands, and every mark of
-- rows as published checks it in the same statement, so a relay that lost the partition
-- cannot mark there any more (the fence).
CREATE TABLE mesh_relay_leases (
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL CHECK (kafka_partition >= 0),
    owner           text,                  -- the relay's name; NULL: free (given back)
    owner_token     bigint,                -- the owner's liveness lock key (relay_slots)
    epoch           bigint      NOT NULL DEFAULT 0,
    acquired_at     timestamptz,
    renewed_at      timestamptz,
    expires_at      timestamptz,
    progress_at     timestamptz,           -- the owner last published or caught up here
    PRIMARY KEY (topic, kafka_partition)
);

-- Live relays, for each relay's fair share: a member counts while it renews its row (a frozen
-- relay stops counting with its leases) and its liveness lock is held (a crashed one at once).
CREATE TABLE mesh_relay_members (
    topic       text        NOT NULL,
    token       bigint      NOT NULL,
    name        text        NOT NULL,
    counted     boolean     NOT NULL,      -- false: a one-shot drain (outbox republish)
    started_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (topic, token)
);
