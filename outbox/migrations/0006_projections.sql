-- Read models folded from the Kafka audit log (outbox/projection*.py). A projection's rows
-- live in <name>_g<generation>, read through the view <name>; its Kafka positions and the
-- event ids it applied are committed in the same transaction as the rows a batch changed.

CREATE TABLE mesh_projections (
    name        text        PRIMARY KEY,
    topic       text        NOT NULL,
    generation  integer     NOT NULL DEFAULT 1,   -- the live table: <name>_g<generation>
    rebuilt_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The next offset to fold, per partition and generation (a rebuild folds a new generation).
CREATE TABLE mesh_projection_offsets (
    name             text        NOT NULL,
    generation       integer     NOT NULL,
    kafka_partition  integer     NOT NULL,
    next_offset      bigint      NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, generation, kafka_partition)
);

-- Event ids a generation applied: the relay may publish an event twice, it is folded once.
CREATE TABLE mesh_projection_applied (
    name        text    NOT NULL,
    generation  integer NOT NULL,
    event_id    text    NOT NULL,
    PRIMARY KEY (name, generation, event_id)
);

-- Records a projection could not fold (not an envelope, or its fold refused it), kept so that
-- a skip is visible in `mesh projection status` rather than silent.
CREATE TABLE mesh_projection_skipped (
    name             text        NOT NULL,
    generation       integer     NOT NULL,
    kafka_partition  integer     NOT NULL,
    kafka_offset     bigint      NOT NULL,
    reason           text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, generation, kafka_partition, kafka_offset)
);

-- The latest snapshot of a session's projected state (the agents' @agent.projection folds):
-- `mesh replay --state` starts from it and reads only the records after (kafka_partition,
-- kafka_offset). `seq` is the highest mesh-seq folded into it, `events` how many events.
CREATE TABLE mesh_session_snapshots (
    topic            text        NOT NULL,
    session_id       text        NOT NULL,
    seq              bigint      NOT NULL,
    kafka_partition  integer     NOT NULL,
    kafka_offset     bigint      NOT NULL,
    events           integer     NOT NULL,
    state            jsonb       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, session_id)
);
