-- Issue 14: the incident timeline and the Home tab.
--
-- `/ops timeline` reads one channel's rows in a time window, oldest first: (channel_id, at) keeps
-- that an index range scan, however large the trail.
CREATE INDEX IF NOT EXISTS audit_events_channel_at ON audit_events (channel_id, at);

-- The Home tab opsbot last published for each person (views.publish answers with its view id). An
-- Approve click from a Home tab counts only when the view it was clicked in is the one opsbot
-- published for the person clicking (bot/home.py): Slack signs the payload, this says it is ours.
CREATE TABLE IF NOT EXISTS home_views (
    user_id      text PRIMARY KEY,
    view_id      text NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);
