"""`/ops db queries <database> [--over 30s]` — the longest running non-idle queries (seed 001:
`SELECT pid, query, state FROM pg_stat_activity WHERE state = 'active'`; seed 004: "look for slow
queries or long-running transactions"). Read-only.

Each line: pid, user, application, how long the query has run, its state and wait event, and its
text cut to ``QUERY_SHOWN`` characters with secret-shaped parts scrubbed (bot/redaction.py). Sessions
"idle in transaction" are listed too (they hold locks and a connection), with what they ran last.
opsbot's own session is left out.
"""

from __future__ import annotations

from typing import Any

from bot.config import Config, parse_duration
from bot.domain import Plan
from bot.ports import Context, Obj
from bot.untrusted import whole_number
from commands.base import Command, Params
from commands.db.common import QUERY_SHOWN, READ_BUDGET, database, database_plan
from commands.shown import span, untrusted

MAX_SHOWN = 15
MAX_OVER = 7 * 86400


def parse_over(value: str) -> int:
    """``30s``, ``5m``, ``2h`` or bare seconds (ASCII digits) → seconds; ValueError otherwise."""
    number = whole_number(value)
    return number if number is not None else parse_duration(value)


def query_line(q: Obj) -> str:
    # (an idle session's wait event, ClientRead, says only that it waits for its client)
    wait = f", waiting on {q['wait_event_type']}/{q['wait_event']}" if q.get("wait_event") and q.get("state") == "active" else ""
    xact = ""
    if str(q.get("state") or "").startswith("idle in transaction") and q.get("xact_seconds") is not None:
        xact = f", transaction open {span(q['xact_seconds'])}"
    return (f"`{q['pid']}` {span(q['query_seconds'])} {q['state']}{wait}{xact} — user `{untrusted(str(q['usename'] or '?'), 60)}`, "
            f"app `{untrusted(str(q['application_name'] or '(no name)'), 60)}`: `{untrusted(str(q['query'] or ''), QUERY_SHOWN)}`")


class DbQueries(Command):
    name = "db-queries"
    words = ("db", "queries")
    usage = "/ops db queries <database> [--over 30s]"
    summary = "The longest running queries of a database (pid, user, app, duration, state, wait, text scrubbed)."
    mutating = False
    backend = "the platform database"
    flags = {"--over": str}

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["database"])
        database(config, args[0])
        over = 0
        if "--over" in flags:
            raw = str(flags["--over"])
            try:
                over = parse_over(raw)
            except ValueError:
                raise self.usage_error(f"`--over` takes a duration such as 30s, 5m or 2h, got `{raw[:40]}`.") from None
            if over > MAX_OVER:
                raise self.usage_error(f"`--over` takes at most 7d, got `{raw[:40]}`.")
        return {"database": args[0], "over_seconds": over}

    def locate(self, params: Params, config: Config) -> Plan | None:
        db = config.databases.get(str(params.get("database", "")))
        return None if db is None else database_plan(self.name, params["database"], db, params, mutating=False,
                                                       summary=f"db queries {params['database']} (not read)")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        name, over = params["database"], int(params.get("over_seconds") or 0)
        db = database(ctx.config, name)
        rows = await ctx.databases.long_queries(name, over_seconds=over, limit=MAX_SHOWN + 1, budget=READ_BUDGET)
        shown = rows[:MAX_SHOWN]
        threshold = f" for {span(over)} or more" if over else ""
        if not shown:
            return database_plan(self.name, name, db, params, mutating=False,
                                 summary=f"{name}: no query has been running{threshold} (idle sessions aside)",
                                 details=(f"`/ops db sessions {name}` counts the connections",), facts={"queries": 0})
        details = [query_line(q) for q in shown]
        if len(rows) > MAX_SHOWN:
            details.append(f"…and more; narrow it with `--over {max(30, over * 2)}s`")
        details.append(f"to stop one: `/ops db cancel {name} <pid>` (the query) or `/ops db terminate {name} <pid>` (the session)")
        longest = span(shown[0]["query_seconds"])
        count = f"{len(shown)}{'+' if len(rows) > MAX_SHOWN else ''}"
        return database_plan(self.name, name, db, params, mutating=False,
                             summary=f"{name}: {count} non-idle quer{'y' if len(shown) == 1 else 'ies'}{threshold}, longest {longest}",
                             details=tuple(details), facts={"queries": len(shown), "longest_seconds": int(shown[0]["query_seconds"] or 0)})
