-- Issue 13: `opsbot audit verify` without re-encoding. Each new row keeps, in ``canon``, the exact
-- text its hash covers (hash = sha256(prev_hash || canon)), so verify reads four text columns and
-- hashes them: no jsonb → text rendering on the server, no JSON decode/encode in Python.
--
-- That the stored columns say what ``canon`` says is enforced by PostgreSQL on every INSERT (and on
-- any UPDATE, were the append-only trigger ever disabled) by the CHECK constraint below: the jsonb
-- of ``canon`` must render exactly as the jsonb built from the columns (text comparison, so even a
-- number's scale, 1.0 vs 1, counts). verify trusts ``canon`` only while this constraint is present,
-- validated and has exactly this definition (bot/adapters/audit_log.py ``canon_trusted``);
-- otherwise, and for the rows written before this migration (``canon`` NULL), it re-derives the
-- canonical text from the columns as before.
--
-- ``canon`` is stored only when the database encoding is UTF8 (the hash is computed over UTF-8
-- bytes); elsewhere it stays NULL and verify takes the slower path.
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS canon text;

ALTER TABLE audit_events ADD CONSTRAINT audit_events_canon_matches CHECK (canon IS NULL OR (canon::jsonb)::text = jsonb_build_object(
    'actor_id', actor_id, 'actor_name', actor_name, 'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00',
    'channel_id', channel_id, 'command_text', command_text, 'event', event, 'plan', plan, 'request_id', request_id,
    'result', result, 'seq', seq)::text);

-- audit_append (migration 008), the same but for ``canon``: same signature, same hash, byte for byte.
CREATE OR REPLACE FUNCTION audit_append(
    p_event text, p_actor_id text, p_actor_name text, p_channel_id text, p_request_id text, p_command_text text,
    p_plan jsonb, p_result jsonb, p_head bytea, p_mid bytea, p_post boolean, p_unless_spooled_id text
) RETURNS TABLE (o_seq bigint, o_at timestamptz, o_prev_hash text, o_hash text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = public, pg_temp AS $$
DECLARE
    v_seq   bigint;
    v_prev  text;
    v_at    timestamptz;
    v_hash  text;
    v_at_js text;
    v_canon text;
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
    v_at_js := '"' || to_char(v_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00"';
    v_hash := encode(sha256(convert_to(v_prev, 'UTF8') || p_head || convert_to(v_at_js, 'UTF8')
                            || p_mid || convert_to(v_seq::text || '}', 'UTF8')), 'hex');
    IF current_setting('server_encoding') = 'UTF8' THEN
        v_canon := convert_from(p_head, 'UTF8') || v_at_js || convert_from(p_mid, 'UTF8') || v_seq::text || '}';
    END IF;
    INSERT INTO audit_events (seq, at, event, actor_id, actor_name, channel_id, request_id, command_text, plan, result,
                              prev_hash, hash, canon)
        VALUES (v_seq, v_at, p_event, p_actor_id, p_actor_name, p_channel_id, p_request_id, p_command_text, p_plan, p_result,
                v_prev, v_hash, v_canon);
    IF p_post THEN
        INSERT INTO audit_outbox (seq, request_id) VALUES (v_seq, p_request_id);
    END IF;
    o_seq := v_seq;
    o_at := v_at;
    o_prev_hash := v_prev;
    o_hash := v_hash;
    RETURN NEXT;
END $$;
