-- Issue 13: `/ops audit` filters at millions of rows. Each filter of AuditLog.search has an index
-- whose last column is seq, so "newest first, one page" reads about a page of index entries
-- (keyset paging: seq < the last one shown) instead of scanning and sorting the table.
-- Indexes need no grants: the bot's role uses them through its SELECT.

CREATE INDEX IF NOT EXISTS audit_events_actor_id ON audit_events (actor_id, seq);
CREATE INDEX IF NOT EXISTS audit_events_actor_name ON audit_events (actor_name, seq);
CREATE INDEX IF NOT EXISTS audit_events_event ON audit_events (event, seq);
CREATE INDEX IF NOT EXISTS audit_events_at ON audit_events (at);
CREATE INDEX IF NOT EXISTS audit_events_plan_command ON audit_events ((plan->>'command'), seq);
CREATE INDEX IF NOT EXISTS audit_events_command_word ON audit_events ((split_part(command_text, ' ', 1)), seq);
CREATE INDEX IF NOT EXISTS audit_events_target_name ON audit_events ((plan->>'target_name'), seq);

-- --target also matches part of a target (ILIKE '%x%'), which only a trigram index serves. pg_trgm
-- is a trusted extension (the database owner may create it) shipped with PostgreSQL's contrib; where
-- it is missing the migration still applies and --target falls back to scanning.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available (%): /ops audit --target will scan audit_events', SQLERRM;
END $$;

DO $$
DECLARE
    ops text;
BEGIN
    SELECT quote_ident(n.nspname) || '.gin_trgm_ops' INTO ops
      FROM pg_opclass c JOIN pg_namespace n ON n.oid = c.opcnamespace WHERE c.opcname = 'gin_trgm_ops' LIMIT 1;
    IF ops IS NOT NULL THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS audit_events_target_label_trgm ON audit_events USING gin ((plan->>''target_label'') %s)', ops);
        EXECUTE format('CREATE INDEX IF NOT EXISTS audit_events_target_trgm ON audit_events USING gin ((plan->>''target'') %s)', ops);
    END IF;
END $$;
