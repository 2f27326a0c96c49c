"""What the `/ops db …` commands share: the database by name, the plan's target, budgets."""

from __future__ import annotations

from typing import Any

from bot.config import Config, Database
from bot.domain import Plan
from bot.errors import NotFound
from bot.untrusted import non_ascii_hint

READ_BUDGET = 1.5  # seconds for a read, connect included: the answer is due within 2 s (bot/pipeline.py)
PLAN_BUDGET = 5.0  # reading the session a cancel/terminate would signal (not under the read deadline)
SIGNAL_BUDGET = 10.0  # the re-check, the signal and up to 2 s of watching it work
QUERY_SHOWN = 300  # characters of a query's text shown


def database(config: Config, name: str) -> Database:
    db = config.databases.get(name)
    if db is None:
        known = ", ".join(sorted(config.databases)) or "none configured"
        raise NotFound(f"unknown database `{name[:100]}`{non_ascii_hint(name[:100])}. Known databases: {known}.")
    return db


def database_plan(command: str, name: str, db: Database, params: dict[str, Any], *, mutating: bool, target: str = "",
                  label: str = "", **fields: Any) -> Plan:
    return Plan(command=command, target=target or f"database/{db.environment}/{name}", target_label=label or f"database {name}",
                environment=db.environment, target_name=name, target_kind="databases", params=params, mutating=mutating, **fields)
