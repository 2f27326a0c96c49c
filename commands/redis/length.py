"""`/ops redis len <target> <key>` — how long a queue or collection is, by the key's type: LLEN
(list: seed 001's `email_queue`, BullMQ's `bull:<queue>:wait`), ZCARD (sorted set: BullMQ's delayed,
failed…), XLEN (stream), SCARD (set), HLEN (hash), STRLEN (string, in bytes). Read-only.

Only keys matching the target's ``keys:`` allow-list are read: the list is what the platform team
decided may be looked at; anything else is refused with the patterns. The key is one exact name:
``*``, ``?`` and ``[`` are refused rather than expanded (opsbot never scans a keyspace).
"""

from __future__ import annotations

from typing import Any

from bot.config import Config
from bot.domain import Plan
from bot.errors import NotFound, Refused
from bot.ports import Context
from bot.untrusted import non_ascii_hint
from commands.base import Command, Params
from commands.redis.common import READ_BUDGET, redis_plan, redis_target
from commands.shown import slack_escape, untrusted

MAX_KEY = 512
_WILDCARDS = set("*?[]")
_UNIT = {"list": ("item", "items"), "zset": ("member", "members"), "stream": ("entry", "entries"), "set": ("member", "members"),
         "hash": ("field", "fields"), "string": ("byte", "bytes")}
_READ = {"list": "LLEN", "zset": "ZCARD", "stream": "XLEN", "set": "SCARD", "hash": "HLEN", "string": "STRLEN"}


def _patterns(patterns: tuple[str, ...]) -> str:
    return ", ".join(f"`{slack_escape(p)}`" for p in patterns)


class RedisLen(Command):
    name = "redis-len"
    words = ("redis", "len")
    usage = "/ops redis len <target> <key>"
    summary = "The length of an allowed Redis key by its type (LLEN, ZCARD, XLEN, SCARD, HLEN)."
    mutating = False
    backend = "Redis"

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["target", "key"])
        name, key = args
        target = redis_target(config, name)
        allowed = (f"Keys allowed on `{name}`: {_patterns(target.keys)} (`*` and `?` are wildcards there)." if target.keys
                   else f"No key is allowed on `{name}` (its `keys:` list in the config is empty).")
        if len(key) > MAX_KEY:
            raise self.usage_error(f"a key name has at most {MAX_KEY} characters here, got {len(key):,}. {allowed}")
        if set(key) & _WILDCARDS:
            raise self.usage_error(f"`redis len` takes one exact key name; `{untrusted(key, 80)}` has a wildcard, which opsbot "
                                   f"does not expand (it never scans the keyspace). {allowed}")
        if not target.allows(key):
            raise Refused(f"key `{untrusted(key, 100)}`{non_ascii_hint(key[:100])} is not in the allow-list of Redis `{name}`. {allowed}")
        return {"target": name, "key": key}

    def locate(self, params: Params, config: Config) -> Plan | None:
        target = config.redis.get(str(params.get("target", "")))
        return None if target is None else redis_plan(self.name, params["target"], target, params,
                                                       summary=f"redis len {params['target']} (not read)")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        name, key = params["target"], params["key"]
        target = redis_target(ctx.config, name)
        shown = untrusted(key, 120)
        kind, length = await ctx.redis.key_length(name, key, budget=READ_BUDGET)
        if kind == "none":
            raise NotFound(f"key `{shown}` does not exist in Redis `{name}` (an empty queue's list is deleted by Redis, "
                           "so this can also mean: empty).")
        if length is None:
            raise Refused(f"key `{shown}` in Redis `{name}` is a {untrusted(kind, 40)}, which has no length opsbot reads "
                          f"({', '.join(sorted(_READ))} have).")
        return redis_plan(self.name, name, target, params, summary=f"`{shown}` in Redis `{name}`: {length:,} {_UNIT[kind][length != 1]}",
                          details=(f"{kind}, read with {_READ[kind]}",), facts={"type": kind, "length": length})
