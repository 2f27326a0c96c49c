"""The platforms' Redis instances (``config.redis``), read-only: ``INFO`` and the length of one key.

Connections come from the shared ``RedisPools`` (one bounded pool per URL; a target on the same
URL as a queue shares its pool). Each call is bounded as a whole by ``budget`` seconds
(bot/adapters/bounded.py), so a Redis that is slow, paused or black-holed is reported, by name,
before the read-only deadline; one that refuses connections is reported at once (``redis_errors``).
Keys are passed to Redis as they are: ``TYPE`` and ``LLEN``… take a key name, never a pattern.
"""

from __future__ import annotations

from typing import Any

from bot.adapters.bounded import within
from bot.adapters.redis_pools import RedisPools, redis_errors
from bot.config import Config

Obj = dict[str, Any]
_LENGTH = {"list": "llen", "zset": "zcard", "stream": "xlen", "set": "scard", "hash": "hlen", "string": "strlen"}


class RedisTargetAdapter:
    def __init__(self, config: Config, pools: RedisPools) -> None:
        self._config, self._pools = config, pools

    def _what(self, target: str) -> str:
        return f"Redis `{target}`"

    async def info(self, target: str, *, budget: float) -> Obj:
        client = self._pools.client(self._config.redis[target].url)

        async def run() -> Obj:
            async with redis_errors(self._what(target)):
                return dict(await client.info())

        return await within(budget, run(), backend=self._what(target))

    async def key_length(self, target: str, key: str, *, budget: float) -> tuple[str, int | None]:
        client = self._pools.client(self._config.redis[target].url)

        async def run() -> tuple[str, int | None]:
            async with redis_errors(self._what(target)):
                kind = str(await client.type(key))
                if kind == "none" or kind not in _LENGTH:
                    return kind, None
                return kind, int(await getattr(client, _LENGTH[kind])(key))

        return await within(budget, run(), backend=self._what(target))
