-- Issue 12: one request per Slack delivery. A slash command that reaches two replicas (Slack's
-- retry with X-Slack-Retry-Num after a slow ack, a Socket Mode envelope redelivered to another
-- connection) carries the same trigger_id; the second INSERT conflicts and opens nothing.
ALTER TABLE ops_requests ADD COLUMN delivery_id text;
CREATE UNIQUE INDEX ops_requests_delivery_id ON ops_requests (delivery_id) WHERE delivery_id IS NOT NULL;
