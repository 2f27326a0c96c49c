"""What the `/ops db …` commands share: the database by name, the plan's target, budgets."""

from __future__ import annotations

from typing import Any

from bot.config import Config, Database
from bot.domain import Plan
from commands.base import named

READ_BUDGET = 1.5  # seconds for a read, connect included: the answer is due within 2 s (bot/pipeline.py)
PLAN_BUDGET = 5.0  # reading the session a cancel/terminate would signal (not under the read deadline)
SIGNAL_BUDGET = 10.0  # the re-check, the signal and up to 2 s of watching it work
QUERY_SHOWN = 300  # characters of a query's text shown


def database(config: Config, name: str) -> Database:
    return named(config.databases, name, "database")


def database_plan(command: str, name: str, db: Database, params: dict[str, Any], *, mutating: bool, target: str = "",
                  label: str = "", **fields: Any) -> Plan:
    return Plan(command=command, target=target or f"database/{db.environment}/{name}", target_label=label or f"database {name}",
                environment=db.environment, target_name=name, target_kind="databases", params=params, mutating=mutating, **fields)
