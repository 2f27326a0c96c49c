"""`/ops redis …`: a platform's Redis, read-only (seed 000: "check Redis"; seed 001: `redis-cli INFO`,
`redis-cli LLEN email_queue`). The target is one of ``redis:`` in the config, never a URL, and
`redis len` reads only keys its allow-list admits. (``commands.redis`` is this package; the redis
client library is never imported by commands: they go through ``bot.ports.RedisTargets``.)"""
