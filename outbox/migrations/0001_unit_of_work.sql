-- The unit of work: an idempotency record, an action record and outbox rows, written in one
-- transaction per consumed batch.

CREATE TABLE mesh_idempotency (
    agent            text        NOT NULL,
    idempotency_key  text        NOT NULL,
    input_event_id   uuid        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, idempotency_key)
);

CREATE TABLE mesh_actions (
    id               bigserial   PRIMARY KEY,
    agent            text        NOT NULL,
    idempotency_key  text        NOT NULL,
    session_id       text        NOT NULL,
    input_event_id   uuid        NOT NULL,
    input_type       text        NOT NULL,
    stream           text        NOT NULL,
    entry_id         text        NOT NULL,
    result           jsonb,
    emitted          integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (agent, idempotency_key)
);
CREATE INDEX mesh_actions_session ON mesh_actions (session_id, id);

-- Every event an action produced: handoffs (stream is set) and the action's own audit event
-- (stream is NULL). The relay publishes rows to Kafka; handoff rows are re-sendable to Redis.
CREATE TABLE mesh_outbox (
    id               bigserial   PRIMARY KEY,
    event_id         uuid        NOT NULL UNIQUE,
    session_id       text        NOT NULL,
    type             text        NOT NULL,
    stream           text,
    envelope         text        NOT NULL,
    agent            text        NOT NULL,
    idempotency_key  text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    kafka_topic      text,
    kafka_partition  integer,
    kafka_offset     bigint
);
CREATE INDEX mesh_outbox_input ON mesh_outbox (agent, idempotency_key);
CREATE INDEX mesh_outbox_session ON mesh_outbox (session_id, id);
CREATE INDEX mesh_outbox_unpublished ON mesh_outbox (id) WHERE published_at IS NULL;
