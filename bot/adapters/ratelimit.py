"""Per-user, per-command rate limits in Redis: a sliding window kept in a sorted set, checked and
recorded atomically by one Lua script (two replicas see the same counts). Redis down → refuse."""

from __future__ import annotations

import time
import uuid

from redis.exceptions import RedisError

from bot.adapters.queues import redis_client
from bot.errors import BackendUnavailable

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
    def __init__(self, redis_url: str, *, prefix: str = "opsbot") -> None:
        self._redis = redis_client(redis_url)
        self._script = self._redis.register_script(_SCRIPT)
        self._prefix = prefix

    async def hit(self, key: str, *, limit: int, window_seconds: int) -> float | None:
        """Record one use of ``key``; None if within the limit, else the seconds until it would be."""
        try:
            wait_ms = await self._script(keys=[f"{self._prefix}:rate:{key}"],
                                         args=[int(time.time() * 1000), window_seconds * 1000, limit, uuid.uuid4().hex])
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("Redis (rate limits)", f"{type(exc).__name__}: {exc}") from exc
        return None if int(wait_ms) < 0 else int(wait_ms) / 1000

    async def close(self) -> None:
        await self._redis.aclose()
