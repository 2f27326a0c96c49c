"""Per-user, per-command rate limits in Redis: a sliding window kept in a sorted set, checked and
recorded atomically by one Lua script (two replicas see the same counts): one round trip per check,
on a connection of the shared pool (bot/adapters/redis_pools.py). Redis down → refuse."""

from __future__ import annotations

import time
import uuid

import redis.asyncio as aioredis

from bot.adapters.redis_pools import redis_errors

_SCRIPT = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
redis.call('ZADD', key, now, ARGV[4])
redis.call('PEXPIRE', key, window)
return -1
"""


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, *, prefix: str = "opsbot") -> None:
        self._script = redis.register_script(_SCRIPT)
        self._prefix = prefix

    async def hit(self, key: str, *, limit: int, window_seconds: int) -> float | None:
        """Record one use of ``key``; None if within the limit, else the seconds until it would be."""
        async with redis_errors("Redis (rate limits)"):
            wait_ms = await self._script(keys=[f"{self._prefix}:rate:{key}"],
                                         args=[int(time.time() * 1000), window_seconds * 1000, limit, uuid.uuid4().hex])
        return None if int(wait_ms) < 0 else int(wait_ms) / 1000
