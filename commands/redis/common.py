"""The Redis target by name, and the plan on it."""

from __future__ import annotations

from typing import Any

from bot.config import Config, RedisTarget
from bot.domain import Plan
from bot.errors import Refused
from commands.base import named

READ_BUDGET = 1.5  # seconds for a read, connect included: the answer is due within 2 s (bot/pipeline.py)


def redis_target(config: Config, name: str) -> RedisTarget:
    if not config.redis:
        raise Refused("no Redis targets are configured here (no `redis:` section in the config).")
    return named(config.redis, name, "Redis target")


def redis_plan(command: str, name: str, target: RedisTarget, params: dict[str, Any], **fields: Any) -> Plan:
    return Plan(command=command, target=f"redis/{target.environment}/{name}", target_label=f"Redis {name}",
                environment=target.environment, target_name=name, target_kind="redis", params=params, mutating=False, **fields)
