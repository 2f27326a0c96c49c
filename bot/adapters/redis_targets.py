"""The platforms' Redis instances (``config.redis``), read-only: ``INFO`` and the length of one key.

Connections come from the shared ``RedisPools`` (one bounded pool per URL; a target on the same
URL as a queue shares its pool). Each call is bounded as a whole by ``budget`` seconds
(bot/adapters/bounded.py), so a Redis that is slow, paused or black-holed is reported, by name,
before the read-only deadline; one that refuses connections is reported at once (``redis_errors``).
Keys are passed to Redis as they are: ``TYPE`` and ``LLEN``… take a key name, never a pattern.

The one write: a flag action's key (`actions:` of kind flag), set by a compare-and-set Lua script so that
a value changed by someone else since the plan is noticed, not overwritten.
"""

from __future__ import annotations

from typing import Any

from bot.adapters.bounded import within
from bot.adapters.redis_pools import RedisPools, redis_errors
from bot.config import Config
from bot.errors import BackendUnavailable, OutcomeUnknown

Obj = dict[str, Any]
# KEYS[1]: the flag; ARGV: expected ("" + flag 0: not set), new value ("" + flag 0: delete).
_CAS = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
if ARGV[3] == '0' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[4]) end
return 1
"""
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

    async def get_value(self, target: str, key: str, *, budget: float) -> str | None:
        client = self._pools.client(self._config.redis[target].url)

        async def run() -> str | None:
            async with redis_errors(self._what(target)):
                value = await client.get(key)
                return None if value is None else str(value)

        return await within(budget, run(), backend=self._what(target))

    async def set_value_if(self, target: str, key: str, *, value: str | None, expect: str | None, budget: float) -> bool:
        client = self._pools.client(self._config.redis[target].url)

        sent = {"at": False}

        async def run() -> bool:
            async with redis_errors(self._what(target)):
                await client.ping()  # so that a Redis that is down is "nothing was sent", not "may have been set"
                sent["at"] = True
                done = await client.eval(_CAS, 1, key, "0" if expect is None else "1", expect or "",  # type: ignore[misc]
                                         "0" if value is None else "1", value or "")
                return bool(int(done))

        try:
            return await within(budget, run(), backend=self._what(target))
        except BackendUnavailable as exc:
            if sent["at"]:
                raise OutcomeUnknown(f"the change of `{key}` was sent to {self._what(target)} and no answer came back ({exc}); "
                                     "it may or may not have been set. Look before trying again.") from exc
            raise
