-- Issue 3: N-of-M with "at least one from each role", break-glass with after-the-fact review,
-- and the approver's roles at the time of the click (evidence for auditors).
ALTER TABLE ops_requests
    ADD COLUMN approvals_each text[] NOT NULL DEFAULT '{}',
    ADD COLUMN break_glass    text NOT NULL DEFAULT '',
    ADD COLUMN review_state   text CHECK (review_state IN ('needed', 'acknowledged')),
    ADD COLUMN reviewed_by    text,
    ADD COLUMN reviewed_at    timestamptz;
ALTER TABLE ops_approvals ADD COLUMN approver_roles text[] NOT NULL DEFAULT '{}';
CREATE INDEX ops_requests_requester_open ON ops_requests (requester_id)
    WHERE state IN ('pending_approval', 'approved', 'running');
