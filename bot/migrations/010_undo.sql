-- Issue 14: undo. A request that undoes another names it (undo_of), so the audit trail links them
-- both ways, and its card links the original's card (undo_of_link, the original card's permalink).
-- At most one undo of a request is open or has succeeded at any time: two fast clicks on Undo, or two
-- replicas handling them, insert one row; the second insert is a unique violation, answered with the
-- first one's id. An undo that was denied, expired, cancelled, stale or failed leaves room for another.
ALTER TABLE ops_requests
    ADD COLUMN undo_of      text REFERENCES ops_requests (id),
    ADD COLUMN undo_of_link text;
CREATE UNIQUE INDEX ops_requests_one_undo ON ops_requests (undo_of)
    WHERE undo_of IS NOT NULL AND state IN ('pending_approval', 'approved', 'running', 'succeeded');

-- A thread reply may carry the Undo button of its request (the "Done" of a request that has an inverse).
ALTER TABLE chat_outbox ADD COLUMN undo_button text;
