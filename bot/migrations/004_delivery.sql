-- Issue 8: every message eventually right, every attempt recorded.

-- Card state through an outbox, latest state wins: every change a card shows bumps card_version
-- (a trigger, in the same statement as the change, so no path can forget it); the notices poster
-- re-renders the card from the row and records the version it showed in card_shown. A card whose
-- update failed is simply still behind, and is updated when Slack is back.
ALTER TABLE ops_requests
    ADD COLUMN card_version         integer NOT NULL DEFAULT 0,
    ADD COLUMN card_shown           integer NOT NULL DEFAULT 0,
    ADD COLUMN card_attempts        integer NOT NULL DEFAULT 0,
    ADD COLUMN card_next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN card_error           text;
CREATE INDEX ops_requests_card_behind ON ops_requests (card_next_attempt_at) WHERE card_version > card_shown;

CREATE FUNCTION ops_requests_card_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.state, NEW.review_state, NEW.reviewed_by, NEW.result, NEW.error)
       IS DISTINCT FROM (OLD.state, OLD.review_state, OLD.reviewed_by, OLD.result, OLD.error) THEN
        NEW.card_version := OLD.card_version + 1;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ops_requests_card_version BEFORE UPDATE ON ops_requests
    FOR EACH ROW EXECUTE FUNCTION ops_requests_card_version();

-- Replies in a request's thread (results, denials, expiry, break-glass notices): posted in order
-- per channel, at most once (an uncertain post is looked for before it is posted again), never
-- retried without bound.
CREATE TABLE chat_outbox (
    id              bigserial PRIMARY KEY,
    request_id      text NOT NULL REFERENCES ops_requests (id),
    text            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    posted_ts       text,
    gave_up         boolean NOT NULL DEFAULT false,
    attempts        integer NOT NULL DEFAULT 0,
    uncertain       boolean NOT NULL DEFAULT false,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_outbox_due ON chat_outbox (id) WHERE posted_ts IS NULL AND NOT gave_up;

-- The audit channel: rows given up on (bounded retries) stay visible, and the headline of each
-- request's thread follows its last posted row even when an update failed.
ALTER TABLE audit_outbox ADD COLUMN gave_up boolean NOT NULL DEFAULT false;
ALTER TABLE audit_threads ADD COLUMN headline_seq bigint NOT NULL DEFAULT 0;

-- Attempts kept in a replica's local spool while this database was down carry an id, so that
-- draining the spool twice never appends one twice.
CREATE INDEX audit_events_spooled ON audit_events ((result->'spooled'->>'id')) WHERE result ? 'spooled';
