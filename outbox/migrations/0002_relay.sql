-- The Kafka relay: wake-ups, slot configuration, and the per-session offset index that lets
-- `mesh replay` seek straight to a session instead of scanning the topic.

-- One NOTIFY per inserting statement (not per row): the relay wakes, then reads in batches.
-- (`mesh outbox republish` sends its own NOTIFY.)
CREATE FUNCTION mesh_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mesh_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER mesh_outbox_notify AFTER INSERT ON mesh_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION mesh_outbox_notify();

-- Relays own Kafka partitions ("slots"): a session's rows go to partition
-- session_hash % partitions. Every relay must count the same partitions, or two relays could
-- own one session at once: the first relay records the count; one that sees another refuses.
CREATE TABLE mesh_relay_config (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    slots  integer NOT NULL CHECK (slots > 0)
);

-- Where each session's events sit in Kafka, as offset ranges. Kept after outbox rows are
-- pruned. A range grows while the session's next records come within a few hundred records of
-- its end, else a new range starts, so replay reads the session's records plus small gaps:
-- its cost follows the session, not the topic, even for a session that lives for months.
CREATE TABLE mesh_audit_index (
    topic         text        NOT NULL,
    session_id    text        NOT NULL,
    kafka_partition integer     NOT NULL,
    first_offset  bigint      NOT NULL,
    last_offset   bigint      NOT NULL,
    records       bigint      NOT NULL,  -- copies published, re-sends included
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, session_id, kafka_partition, first_offset)
);

CREATE INDEX mesh_outbox_published ON mesh_outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX mesh_outbox_created ON mesh_outbox (created_at);

-- Kafka headers without parsing every envelope in the relay, and the session's partition
-- hash: murmur2(session_id) & 0x7fffffff, what Kafka's default partitioner computes for the key.
ALTER TABLE mesh_outbox
    ADD COLUMN causation_id   text,
    ADD COLUMN schema_version integer NOT NULL DEFAULT 1,
    ADD COLUMN session_hash   integer NOT NULL;
