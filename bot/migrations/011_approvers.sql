-- Issue 14, approvers who get told. What the policy's approval block said about reminders and
-- escalation is carried on the request row (the policy may change while a request waits), with who
-- may be asked: approvers_named holds the user ids (U…/W…) and Slack user group ids (S…) of the
-- approver roles, the requester left out, for the card's mentions. Escalation widens who may
-- approve (approver_roles gains escalate_to; the quorum, count and each_of, is unchanged) and says
-- when (escalated_at). A deny's reason (the Deny dialog) is kept with the row.
ALTER TABLE ops_requests
    ADD COLUMN remind_after    integer CHECK (remind_after IS NULL OR remind_after > 0),   -- seconds; NULL: never
    ADD COLUMN escalate_after  integer CHECK (escalate_after IS NULL OR escalate_after > 0),
    ADD COLUMN escalate_to     text[] NOT NULL DEFAULT '{}',
    ADD COLUMN approvers_named text[] NOT NULL DEFAULT '{}',
    ADD COLUMN escalated_at    timestamptz,
    ADD COLUMN deny_reason     text;

-- The reminders sweep (bot/reminders.py), run by every replica: one row per request and kind
-- (remind: the approvers; escalate: the escalation role; review: a break-glass run's reviewers,
-- repeated with backoff until acknowledged). A due row is claimed with one conditional UPDATE
-- (claimed_by/claimed_at, a claim older than the lease is taken again), so among replicas one sends
-- it. told lists who got this round's direct message already: a retry after a failure (Slack or
-- Redis down) sends only to the rest, so nobody is told twice and nobody is left out.
CREATE TABLE approval_reminders (
    request_id  text NOT NULL REFERENCES ops_requests (id),
    kind        text NOT NULL CHECK (kind IN ('remind', 'escalate', 'review')),
    due_at      timestamptz NOT NULL,
    rounds      integer NOT NULL DEFAULT 0,
    told        text[] NOT NULL DEFAULT '{}',
    claimed_by  text,
    claimed_at  timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    done_at     timestamptz,
    outcome     text CHECK (outcome IN ('sent', 'closed', 'nobody')),
    PRIMARY KEY (request_id, kind)
);
CREATE INDEX approval_reminders_due ON approval_reminders (due_at) WHERE done_at IS NULL;
