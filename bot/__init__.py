"""opsbot: ChatOps for production. See README.md; the flow is
Slack payload → parse → plan → policy decision → approval → execute → audit."""
