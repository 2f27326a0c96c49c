-- opsbot's own state. The request row is the source of truth; every state change is a
-- conditional UPDATE naming the state it leaves (see bot/adapters/store.py).
CREATE TABLE ops_requests (
    id               text PRIMARY KEY,
    command          text NOT NULL,
    command_text     text NOT NULL,
    requester_id     text NOT NULL,
    requester_name   text NOT NULL DEFAULT '',
    channel_id       text NOT NULL,
    target           text NOT NULL,
    environment      text NOT NULL,
    plan             jsonb NOT NULL,
    fingerprint      text NOT NULL,
    reason           text NOT NULL DEFAULT '',
    state            text NOT NULL CHECK (state IN ('pending_approval', 'approved', 'running', 'succeeded', 'failed',
                                                    'denied', 'expired', 'cancelled', 'stale', 'unknown')),
    approvals_required integer NOT NULL CHECK (approvals_required >= 0),
    approver_roles   text[] NOT NULL DEFAULT '{}',
    rule             text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    decided_at       timestamptz,
    claimed_by       text,
    claimed_at       timestamptz,
    heartbeat_at     timestamptz,
    finished_at      timestamptz,
    result           jsonb,
    error            text,
    card_channel     text,
    card_ts          text
);
CREATE INDEX ops_requests_open ON ops_requests (state, expires_at) WHERE state IN ('pending_approval', 'approved', 'running');

CREATE TABLE ops_approvals (
    request_id    text NOT NULL REFERENCES ops_requests (id),
    approver_id   text NOT NULL,
    approver_name text NOT NULL DEFAULT '',
    decision      text NOT NULL CHECK (decision IN ('approve', 'deny')),
    at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (request_id, approver_id)
);

-- The requester can never approve their own request, whatever the code above does.
CREATE FUNCTION ops_approvals_not_self() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM ops_requests r WHERE r.id = NEW.request_id AND r.requester_id = NEW.approver_id) THEN
        RAISE EXCEPTION 'requester % cannot approve own request %', NEW.approver_id, NEW.request_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ops_approvals_not_self BEFORE INSERT OR UPDATE ON ops_approvals
    FOR EACH ROW EXECUTE FUNCTION ops_approvals_not_self();

-- The audit trail: append-only, hash-chained (hash = sha256(prev_hash || canonical JSON of the row),
-- see bot/audit.py). seq is assigned under an advisory lock so the chain never forks.
CREATE TABLE audit_events (
    seq           bigint PRIMARY KEY,
    at            timestamptz NOT NULL,
    event         text NOT NULL,
    actor_id      text NOT NULL,
    actor_name    text NOT NULL DEFAULT '',
    channel_id    text NOT NULL DEFAULT '',
    request_id    text,
    command_text  text NOT NULL DEFAULT '',
    plan          jsonb,
    result        jsonb,
    prev_hash     text NOT NULL,
    hash          text NOT NULL UNIQUE
);
CREATE INDEX audit_events_request ON audit_events (request_id);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
