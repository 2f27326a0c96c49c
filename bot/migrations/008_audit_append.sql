-- Issue 13: an audit append is one statement. The chain's lock used to be held across five round
-- trips (lock, read the head, insert the row, insert the outbox entry, commit), with the holder
-- "idle in transaction" while Python computed the hash: every append in every process queued
-- behind that. Here the lock, the head, the hash and both inserts run inside the server, in one
-- call from an autocommit connection, so the lock is held only for the server's own work.
--
-- The hash is the same, byte for byte: sha256(prev_hash || canonical_json(record)). Python writes
-- the canonical JSON of everything but ``at`` and ``seq`` (only known under the lock) as two UTF-8
-- byte strings: p_head (up to ``"at":``) and p_mid (from after ``at`` up to ``"seq":``); keys
-- sort as actor_id, actor_name, at, channel_id, command_text, event, plan, request_id, result, seq,
-- so seq is last. What this function adds is ASCII only (the previous hash, ``at`` as
-- ISO-8601 UTC with microseconds, the seq, ``}``), so the bytes do not depend on the database's
-- encoding. bot/adapters/audit_log.py recomputes the hash in Python from what comes back and
-- logs loudly if the two ever differ; tests/unit/test_audit_append.py checks they agree.
--
-- SECURITY INVOKER (the default): the caller needs INSERT on audit_events and audit_outbox and
-- SELECT on audit_events and audit_checkpoints, which the bot's role has anyway; the function
-- gives nobody any power they did not have, so EXECUTE may go to PUBLIC. Each statement inside a
-- VOLATILE PL/pgSQL function takes a fresh snapshot, so the head is read after the lock is had
-- (a single INSERT … SELECT taking the lock in a CTE would read a snapshot from before it).
CREATE FUNCTION audit_append(
    p_event text, p_actor_id text, p_actor_name text, p_channel_id text, p_request_id text, p_command_text text,
    p_plan jsonb, p_result jsonb, p_head bytea, p_mid bytea, p_post boolean, p_unless_spooled_id text
) RETURNS TABLE (o_seq bigint, o_at timestamptz, o_prev_hash text, o_hash text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = public, pg_temp AS $$
DECLARE
    v_seq  bigint;
    v_prev text;
    v_at   timestamptz;
    v_hash text;
BEGIN
    PERFORM pg_advisory_xact_lock(658711);  -- 0x0A0D17, the chain's lock (audit_log._AUDIT_LOCK; prune takes it too)
    IF p_unless_spooled_id IS NOT NULL AND EXISTS (
            SELECT 1 FROM audit_events e WHERE e.result ? 'spooled' AND e.result->'spooled'->>'id' = p_unless_spooled_id) THEN
        RETURN;  -- a spooled row appended before: nothing
    END IF;
    SELECT e.seq + 1, e.hash INTO v_seq, v_prev FROM audit_events e ORDER BY e.seq DESC LIMIT 1;
    IF NOT FOUND THEN  -- empty: after the genesis, or after a prune's checkpoint
        SELECT c.upto_seq + 1, c.last_hash INTO v_seq, v_prev FROM audit_checkpoints c ORDER BY c.upto_seq DESC LIMIT 1;
        IF NOT FOUND THEN
            v_seq := 1;
            v_prev := repeat('0', 64);
        END IF;
    END IF;
    -- clock_timestamp(), not now(): taken under the lock, so ``at`` never goes back as seq goes up.
    v_at := date_trunc('microseconds', clock_timestamp());
    v_hash := encode(sha256(
        convert_to(v_prev, 'UTF8') || p_head
        || convert_to('"' || to_char(v_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00"', 'UTF8')
        || p_mid || convert_to(v_seq::text || '}', 'UTF8')), 'hex');
    INSERT INTO audit_events (seq, at, event, actor_id, actor_name, channel_id, request_id, command_text, plan, result,
                              prev_hash, hash)
        VALUES (v_seq, v_at, p_event, p_actor_id, p_actor_name, p_channel_id, p_request_id, p_command_text, p_plan, p_result,
                v_prev, v_hash);
    IF p_post THEN
        INSERT INTO audit_outbox (seq, request_id) VALUES (v_seq, p_request_id);
    END IF;
    o_seq := v_seq;
    o_at := v_at;
    o_prev_hash := v_prev;
    o_hash := v_hash;
    RETURN NEXT;
END $$;

GRANT EXECUTE ON FUNCTION audit_append(text, text, text, text, text, text, jsonb, jsonb, bytea, bytea, boolean, text) TO PUBLIC;

-- The audit poster: under a backlog several requests share one headline message (Slack posts about
-- one message per second per channel); redrawing it finds its requests by the message.
CREATE INDEX audit_threads_message ON audit_threads (channel, ts);
