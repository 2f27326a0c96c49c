-- Issue 4: the audit channel outbox, per-request audit threads, retention checkpoints.

-- One row per audit row to copy to the audit channel. Written in the same transaction as the
-- audit row, so nothing recorded is ever left unposted; posted_ts makes a post happen once.
CREATE TABLE audit_outbox (
    seq             bigint PRIMARY KEY,
    request_id      text,
    posted_ts       text,
    attempts        integer NOT NULL DEFAULT 0,
    uncertain       boolean NOT NULL DEFAULT false,   -- a post may have reached Slack before we lost the answer
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_outbox_unposted ON audit_outbox (seq) WHERE posted_ts IS NULL;

-- The headline message of each request in the audit channel (its thread holds the steps).
CREATE TABLE audit_threads (
    request_id text PRIMARY KEY,
    channel    text NOT NULL,
    ts         text NOT NULL,
    permalink  text
);

-- Retention: what `opsbot audit prune` removed, so what remains still verifies. Each checkpoint
-- is itself chained: hash = sha256(prev checkpoint hash || canonical JSON of the checkpoint).
CREATE TABLE audit_checkpoints (
    upto_seq    bigint PRIMARY KEY,
    last_hash   text NOT NULL,            -- the hash of row upto_seq: where the remaining chain starts
    rows_pruned bigint NOT NULL,
    pruned_at   timestamptz NOT NULL,
    prev_hash   text NOT NULL,
    hash        text NOT NULL
);

-- Deleting audit rows is refused, except by `opsbot audit prune` (which sets opsbot.prune_upto in
-- its own transaction, as the owner) and only for rows a checkpoint already covers.
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('opsbot.prune_upto', true) IS NOT NULL
       AND current_setting('opsbot.prune_upto', true) <> ''
       AND OLD.seq <= current_setting('opsbot.prune_upto', true)::bigint
       AND OLD.seq <= (SELECT coalesce(max(upto_seq), 0) FROM audit_checkpoints) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE OR REPLACE FUNCTION audit_checkpoints_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_checkpoints is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_append_only();

-- Nobody but the owner gets anything by default; `opsbot migrate --app-role NAME` grants the
-- bot's role what it needs: no UPDATE or DELETE on the audit tables.
REVOKE ALL ON audit_events, audit_checkpoints FROM PUBLIC;
