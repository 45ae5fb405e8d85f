-- Sessions waiting on a human (`schemas/approval.waiting`): found without scanning every action.
CREATE INDEX IF NOT EXISTS mesh_actions_waiting ON mesh_actions (id) WHERE result ? 'waiting';
CREATE INDEX IF NOT EXISTS mesh_actions_session_end ON mesh_actions (session_id)
    WHERE result ? 'session_end';
