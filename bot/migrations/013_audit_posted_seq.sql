-- Issue 13: the audit poster's every round asked, for every request thread ever posted, the
-- newest posted row of its request: a walk of audit_outbox backwards per thread (no index has
-- request_id), so a round grew with the whole history: 25–47 ms at 3,000 threads, 1.3 s at
-- 30,000, with nothing to redraw (a fault probe's pg_stat_statements: 54–68 % of the database's
-- time per execution). Each thread now keeps the newest posted row of its request (posted_seq,
-- written by the statement that marks rows posted); a headline is behind when posted_seq >
-- headline_seq, which a partial index holds: a round reads the threads that are behind, not all.

-- (request_id, seq) of posted rows: a thread saved after its rows were posted starts from them.
CREATE INDEX IF NOT EXISTS audit_outbox_posted ON audit_outbox (request_id, seq) WHERE posted_ts IS NOT NULL;

ALTER TABLE audit_threads ADD COLUMN IF NOT EXISTS posted_seq bigint NOT NULL DEFAULT 0;

UPDATE audit_threads t SET posted_seq = s.seq
FROM (SELECT o.request_id, max(o.seq) AS seq FROM audit_outbox o WHERE o.posted_ts IS NOT NULL GROUP BY o.request_id) s
WHERE t.request_id = s.request_id AND t.posted_seq < s.seq;

-- (by posted_seq: a round redraws the oldest first, walking this index)
CREATE INDEX IF NOT EXISTS audit_threads_behind ON audit_threads (posted_seq) WHERE posted_seq > headline_seq;
