-- Issue 13: the audit poster's every round asked, for every request thread ever posted, the
-- newest posted row of its request: a walk of audit_outbox backwards per thread (no index has
-- request_id), so a round grew with the whole history: 1.2 s at 3,000 earlier requests, minutes
-- at 30,000, with nothing to redraw (bench/audit_drain.py --history; a profile of two workers:
-- 54–68 % of the database's time per execution). Each thread now keeps the newest posted row of
-- its request (posted_seq); a headline is behind when posted_seq > headline_seq, which a partial
-- index holds: a round reads the threads that are behind, not all of them.

-- (request_id, seq) of posted rows: a thread saved after its rows were posted starts from them.
CREATE INDEX IF NOT EXISTS audit_outbox_posted ON audit_outbox (request_id, seq) WHERE posted_ts IS NOT NULL;

ALTER TABLE audit_threads ADD COLUMN IF NOT EXISTS posted_seq bigint NOT NULL DEFAULT 0;

-- posted_seq is moved by the database itself, after any statement that marks outbox rows posted
-- (one UPDATE per statement, never backwards): whatever code marks them, a replica of an older
-- opsbot during a rolling upgrade among them, the threads follow.
CREATE OR REPLACE FUNCTION audit_threads_follow_posted() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = public, pg_temp AS $$
BEGIN
    UPDATE audit_threads t SET posted_seq = p.seq
    FROM (SELECT request_id, max(seq) AS seq FROM posted_rows
          WHERE posted_ts IS NOT NULL AND request_id IS NOT NULL GROUP BY request_id) p
    WHERE t.request_id = p.request_id AND t.posted_seq < p.seq;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS audit_outbox_posted_seq ON audit_outbox;
CREATE TRIGGER audit_outbox_posted_seq AFTER UPDATE ON audit_outbox
    REFERENCING NEW TABLE AS posted_rows FOR EACH STATEMENT EXECUTE FUNCTION audit_threads_follow_posted();

UPDATE audit_threads t SET posted_seq = s.seq
FROM (SELECT o.request_id, max(o.seq) AS seq FROM audit_outbox o WHERE o.posted_ts IS NOT NULL GROUP BY o.request_id) s
WHERE t.request_id = s.request_id AND t.posted_seq < s.seq;

-- (by posted_seq: a round redraws the oldest first, walking this index)
CREATE INDEX IF NOT EXISTS audit_threads_behind ON audit_threads (posted_seq) WHERE posted_seq > headline_seq;
