-- Operator identity that cannot be typed, and operator rights by role.
--
-- Every operator action is a `mesh.operator` row in mesh_outbox (outbox/operator.py). The
-- database, not the client, says who wrote it: a trigger sets the payload's `operator` (and
-- the envelope's `source`, the row's `agent`) to session_user, the role the connection logged
-- in as. A name the client wrote that differs is kept as `detail.claimed_by`, never as the
-- identity. The same trigger refuses the row unless that role may take the action:
--
--   approve, reject            member of mesh_approve
--   dlq.*, outbox.*            member of mesh_dlq
--   audit.heal                 member of mesh_relay
--
-- Superusers and members of the role that owns mesh_outbox (a deployment that runs everything
-- under one credential, as the local stack does) may take every action. The group roles are
-- created by `mesh access pg-roles` (agentmesh/access/pg_roles.py), not here: roles belong to
-- the cluster, and the migrating role need not be allowed to create them.

-- The group role an action needs; NULL: not an operator action this mesh knows.
CREATE FUNCTION mesh_operator_right(action text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN action IN ('approve', 'reject') THEN 'mesh_approve'
        WHEN action LIKE 'dlq.%' OR action LIKE 'outbox.%' THEN 'mesh_dlq'
        WHEN action = 'audit.heal' THEN 'mesh_relay'
    END
$$;

-- May the role of this connection act as a member of `grp`?
CREATE FUNCTION mesh_session_may(grp text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = session_user), false)
        OR coalesce((SELECT pg_has_role(session_user, c.relowner, 'MEMBER')
                     FROM pg_class c WHERE c.oid = 'mesh_outbox'::regclass), false)
        OR (grp IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = grp)
            AND pg_has_role(session_user, grp, 'MEMBER'))
$$;

CREATE FUNCTION mesh_operator_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    env     jsonb := NEW.envelope::jsonb;
    act     text := env #>> '{payload,action}';
    grp     text := mesh_operator_right(act);
    who     text := session_user;
    claimed text := env #>> '{payload,operator}';
BEGIN
    IF env ->> 'type' IS DISTINCT FROM 'mesh.operator' THEN
        RAISE EXCEPTION 'a mesh.operator row must carry a mesh.operator envelope'
            USING ERRCODE = 'check_violation';
    END IF;
    IF grp IS NULL THEN
        RAISE EXCEPTION 'unknown operator action %', coalesce(act, '(none)')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT mesh_session_may(grp) THEN
        RAISE EXCEPTION 'role "%" may not %: it needs membership in %', who, act, grp
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('GRANT %I TO %I;', grp, who);
    END IF;
    IF coalesce(claimed, '') NOT IN ('', who) THEN
        env := jsonb_set(env, '{payload,detail}',
                         coalesce(env #> '{payload,detail}', '{}'::jsonb)
                         || jsonb_build_object('claimed_by', claimed));
    END IF;
    env := jsonb_set(env, '{payload,operator}', to_jsonb(who));
    env := jsonb_set(env, '{source}', to_jsonb('operator:' || who));
    NEW.envelope := env::text;
    NEW.agent := 'operator:' || who;
    RETURN NEW;
END $$;

CREATE TRIGGER mesh_operator_stamp BEFORE INSERT ON mesh_outbox
    FOR EACH ROW WHEN (NEW.type = 'mesh.operator') EXECUTE FUNCTION mesh_operator_stamp();

-- The type column is what the trigger above keys on; the envelope's own type is what Kafka
-- readers see. They must agree, or a row typed 'x' could carry a `mesh.operator` envelope past
-- the trigger. Parsing every envelope would cost more than the insert itself, so only a row
-- whose text mentions "operator" or has a \u escape (which could spell it) is parsed. (json:
-- a key given twice counts as its last value, as Python's json reads it.)
ALTER TABLE mesh_outbox ADD CONSTRAINT mesh_outbox_type_is_envelope_type CHECK (
    type = 'mesh.operator'
    OR (strpos(envelope, 'operator') = 0 AND strpos(envelope, '\u') = 0)
    OR type = (envelope::json ->> 'type')
) NOT VALID;

-- A stamped row is never rewritten: the relay marks rows (published_at, kafka_*), nobody edits
-- what an operator row says or who wrote it.
CREATE FUNCTION mesh_operator_frozen() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'an operator action row cannot be changed (event %)', OLD.event_id
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER mesh_operator_frozen BEFORE UPDATE OF envelope, agent, type ON mesh_outbox
    FOR EACH ROW WHEN (OLD.type = 'mesh.operator') EXECUTE FUNCTION mesh_operator_frozen();

-- Agents' rows are their own. A role in the group mesh_agent sees and writes only the rows of
-- its agent (`agent` = its name, or `<name>:<job>` for what its periodic jobs publish), reads
-- besides the outbox rows of sessions it acted in, and writes only outbox rows bound for the
-- streams it emits (or for no stream: the audit log). Which
-- agent a role is, and its streams, is recorded by `mesh access pg-roles`; an agent role with
-- no entry here sees and writes nothing. Other roles are not limited by these policies (their
-- grants are), and the tables' owner bypasses row security altogether.
CREATE TABLE mesh_agent_roles (
    role     text   PRIMARY KEY,
    agent    text   NOT NULL,
    streams  text[] NOT NULL DEFAULT '{}'
);

-- The agent of this connection's role: NULL when the role is not an agent's, '' when it is
-- one with no entry in mesh_agent_roles.
-- SECURITY DEFINER: every role the policies apply to may ask (session_user is still the
-- caller's), without a grant on the table.
CREATE FUNCTION mesh_session_agent() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mesh_agent') THEN NULL
        WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = session_user) THEN NULL
        WHEN NOT pg_has_role(session_user, 'mesh_agent', 'MEMBER') THEN NULL
        ELSE coalesce((SELECT agent FROM mesh_agent_roles WHERE role = session_user), '')
    END
$$;

CREATE FUNCTION mesh_session_streams() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT coalesce((SELECT streams FROM mesh_agent_roles WHERE role = session_user), '{}')
$$;

-- Did this connection's agent act in the session? (SECURITY DEFINER: the policy below is
-- planned for every role, and the relay has no grant on mesh_actions.)
CREATE FUNCTION mesh_session_agent_acted_in(session text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT EXISTS (SELECT 1 FROM mesh_actions
                   WHERE session_id = session AND agent = mesh_session_agent())
$$;

-- (SELECT f()) is computed once per statement (an initplan), not once per row.
ALTER TABLE mesh_idempotency ENABLE ROW LEVEL SECURITY;
CREATE POLICY mesh_agent_own ON mesh_idempotency
    USING ((SELECT mesh_session_agent()) IS NULL OR agent = (SELECT mesh_session_agent()));

ALTER TABLE mesh_actions ENABLE ROW LEVEL SECURITY;
CREATE POLICY mesh_agent_own ON mesh_actions
    USING ((SELECT mesh_session_agent()) IS NULL OR agent = (SELECT mesh_session_agent()));

ALTER TABLE mesh_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY mesh_agent_own ON mesh_outbox
    USING ((SELECT mesh_session_agent()) IS NULL
           OR ((SELECT mesh_session_agent()) <> ''
               AND (agent = (SELECT mesh_session_agent())
                    OR starts_with(agent, (SELECT mesh_session_agent()) || ':')
                    -- the rows of a session it acted in (when the session began: metrics)
                    OR mesh_session_agent_acted_in(session_id))))
    WITH CHECK ((SELECT mesh_session_agent()) IS NULL
                OR ((SELECT mesh_session_agent()) <> ''
                    AND (agent = (SELECT mesh_session_agent())
                         OR starts_with(agent, (SELECT mesh_session_agent()) || ':'))
                    AND (stream IS NULL OR ARRAY[stream] <@ (SELECT mesh_session_streams()))));
