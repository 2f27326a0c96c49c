"""`/ops redis info <target>` — what `redis-cli INFO` says matters in an incident: memory (used,
peak, maxmemory and its policy), clients (connected, blocked), keys evicted and expired, ops/s,
the keyspace hit rate and the replication role. Read-only."""

from __future__ import annotations

from typing import Any

from bot.config import Config
from bot.domain import Plan
from bot.messages import plural
from bot.ports import Context, Obj
from commands.base import Command, Params
from commands.redis.common import READ_BUDGET, redis_plan, redis_target
from commands.shown import span, untrusted

WARN_MEMORY = 0.9


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _int(info: Obj, key: str) -> int | None:
    value = info.get(key)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def describe(name: str, info: Obj) -> tuple[str, list[str], dict[str, Any]]:
    used, peak, limit = _int(info, "used_memory"), _int(info, "used_memory_peak"), _int(info, "maxmemory")
    policy = untrusted(str(info.get("maxmemory_policy") or "?"), 40)
    clients, blocked = _int(info, "connected_clients"), _int(info, "blocked_clients")
    evicted, expired = _int(info, "evicted_keys"), _int(info, "expired_keys")
    ops = _int(info, "instantaneous_ops_per_sec")
    hits, misses = _int(info, "keyspace_hits") or 0, _int(info, "keyspace_misses") or 0
    role = untrusted(str(info.get("role") or "?"), 20)
    warnings: list[str] = []
    if used is not None and limit:
        memory = f"{human_bytes(used)} used of maxmemory {human_bytes(limit)} ({used / limit:.0%})"
        if used >= WARN_MEMORY * limit:
            what = "writes will be refused (OOM)" if policy == "noeviction" else "keys are being evicted"
            warnings.append(f":warning: memory at {used / limit:.0%} of maxmemory with policy `{policy}`: {what}")
    else:
        memory = f"{human_bytes(used or 0)} used, no maxmemory set"
    peak_text = f", peak {human_bytes(peak)}" if peak is not None else ""
    details = [f"memory: {memory}{peak_text}; policy `{policy}`",
               f"clients: {clients if clients is not None else '?'} connected, {blocked if blocked is not None else '?'} blocked "
               "(BullMQ workers wait blocked)" + (f", maxclients {info['maxclients']}" if "maxclients" in info else "")]
    keyspace = [f"{db} {int(v.get('keys', 0)):,}" for db, v in sorted(info.items())
                if db.startswith("db") and db[2:].isdigit() and isinstance(v, dict)]
    details.append(f"keys: {', '.join(keyspace) or 'none'}; since start {evicted if evicted is not None else '?'} evicted, "
                   f"{expired if expired is not None else '?'} expired")
    rate = f"{hits / (hits + misses):.1%}" if hits + misses else "— (no lookups yet)"
    details.append(f"traffic: {ops if ops is not None else '?'} ops/s now; keyspace hit rate {rate} ({hits:,} hits, {misses:,} misses)")
    if role == "master":
        details.append(f"replication: primary, {plural(_int(info, 'connected_slaves') or 0, 'replica')}")
    elif role == "slave":
        link = str(info.get("master_link_status") or "?")
        details.append(f"replication: replica of {untrusted(str(info.get('master_host') or '?'), 100)}:{info.get('master_port', '?')}, "
                       f"link {untrusted(link, 20)}")
        if link != "up":
            warnings.append(":warning: the replica's link to its primary is down")
    else:
        details.append(f"replication: role {role}")
    if (_int(info, "rejected_connections") or 0) > 0:
        rejected = _int(info, "rejected_connections") or 0
        warnings.append(f":warning: {plural(rejected, 'connection')} rejected since start (maxclients reached)")
    version = untrusted(str(info.get("redis_version") or "?"), 40)
    uptime = _int(info, "uptime_in_seconds")
    details.append(f"server: Redis {version}, up {span(uptime) if uptime is not None else '?'}")
    summary = (f"Redis `{name}`: {human_bytes(used or 0)} used{f' of {human_bytes(limit)}' if limit else ''}, "
               f"{clients if clients is not None else '?'} clients, {ops if ops is not None else '?'} ops/s, role {role}")
    facts = {"used_memory": used, "maxmemory": limit, "connected_clients": clients, "blocked_clients": blocked,
             "evicted_keys": evicted, "role": role}
    return summary, warnings + details, facts


class RedisInfo(Command):
    name = "redis-info"
    words = ("redis", "info")
    usage = "/ops redis info <target>"
    summary = "A Redis target's memory, clients, evictions, ops/s, hit rate and replication role (INFO)."
    mutating = False
    backend = "Redis"

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["target"])
        redis_target(config, args[0])
        return {"target": args[0]}

    def locate(self, params: Params, config: Config) -> Plan | None:
        target = config.redis.get(str(params.get("target", "")))
        return None if target is None else redis_plan(self.name, params["target"], target, params,
                                                       summary=f"redis info {params['target']} (not read)")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        name = params["target"]
        target = redis_target(ctx.config, name)
        info = await ctx.redis.info(name, budget=READ_BUDGET)
        summary, details, facts = describe(name, info)
        return redis_plan(self.name, name, target, params, summary=summary, details=tuple(details), facts=facts)
