"""`/ops db …`: a platform database's sessions as ``pg_stat_activity`` shows them, and cancelling or
terminating one of them (seeds 001 and 004: "check active connections", "look for slow queries or
long-running transactions"). The database is one of ``databases:`` in the config, never a URL."""
