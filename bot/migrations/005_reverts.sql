-- Issue 10: a flag action's `revert_after`. One row per request whose change is to be put back
-- later; the worker's sweeper announces it (announced_at, once), then claims it when due with one
-- conditional UPDATE (claimed_by/claimed_at: a claim older than the lease is taken again, so a
-- replica lost mid-revert does not lose it) and records how it ended (done_at, outcome). A backend
-- down at revert time puts the row back unclaimed with next_attempt_at later; warned_at says the
-- thread and the audit trail were told once.
CREATE TABLE scheduled_reverts (
    request_id      text PRIMARY KEY REFERENCES ops_requests (id),
    due_at          timestamptz NOT NULL,
    announce_at     timestamptz NOT NULL,
    announced_at    timestamptz,
    claimed_by      text,
    claimed_at      timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    warned_at       timestamptz,
    done_at         timestamptz,
    outcome         text CHECK (outcome IN ('reverted', 'skipped', 'failed', 'superseded')),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX scheduled_reverts_open ON scheduled_reverts (due_at) WHERE done_at IS NULL;
