"""Configs with `actions:` for the tests: the Nova example plus an actions section and rules for it."""

from __future__ import annotations

from typing import Any

import yaml

from bot.config import Config, parse_config
from tests.conftest import EXAMPLE


def example_with_actions(actions: str) -> dict[str, Any]:
    """The Nova example as YAML data with ``actions`` instead of its own (and without the rules that
    name its own), for a test to add rules to and write out."""
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    own = set(raw.get("actions") or {})
    raw["actions"] = yaml.safe_load(actions)
    raw["rules"] = [r for r in raw["rules"] if not set(r["commands"]) & own]
    return raw


def config_with_actions(platform_db: str, redis_url: str, queue_prefix: str, actions: str, *, rules: str = "",
                        env: dict[str, str] | None = None, extra: str = "") -> Config:
    """policies/examples/nova-rms.yaml with ``actions`` (YAML of the `actions:` mapping) and, unless
    ``rules`` (YAML list items) says otherwise, one rule: engineers and approvers run every action,
    one approver approves. ``extra``: more top-level YAML (e.g. a `redis:` section replacing the example's)."""
    raw = example_with_actions(actions)
    raw["rules"] = [*raw["rules"], *(yaml.safe_load(rules) if rules else [
        {"name": "actions", "commands": list(raw["actions"]), "allow": ["engineer", "approver"],
         "approval": {"from": ["approver"], "count": 1, "expires": "15m"}}])]
    if extra:
        raw.update(yaml.safe_load(extra))
    env = {"NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url, **(env or {})}
    config = parse_config(yaml.safe_dump(raw, sort_keys=False), source="test-actions.yaml", env=env)
    queues = {k: q.model_copy(update={"prefix": queue_prefix}) for k, q in config.queues.items()}
    return config.model_copy(update={"queues": queues})
