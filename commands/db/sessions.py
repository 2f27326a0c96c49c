"""`/ops db sessions <database>` — who is connected, against ``max_connections`` (seed 001's
"Database Connection Pool Exhausted": `SELECT count(*) FROM pg_stat_activity`; seed 004's "check
DB connections and max limits"). Read-only.

``max_connections`` is the server's, so the count is the server's client connections (opsbot's
own one included: it takes a slot too); the breakdown by state and application is this
database's. A role without ``pg_read_all_stats`` sees other roles' sessions without a state:
they are counted as hidden, and the answer says what to grant.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from bot.config import Config
from bot.domain import Plan
from bot.messages import plural
from bot.ports import Context, Obj
from commands.base import Command, Params
from commands.db.common import READ_BUDGET, database, database_plan
from commands.shown import span, untrusted

TOP_APPS = 5
WARN_SHARE = 0.8  # seed 003 alerts at 80 % of the pool, seed 001 at 90 %
_STATE_ORDER = ("active", "idle in transaction", "idle in transaction (aborted)", "fastpath function call", "idle", "disabled")


class DbSessions(Command):
    name = "db-sessions"
    words = ("db", "sessions")
    usage = "/ops db sessions <database>"
    summary = "A database's connections (pg_stat_activity) by state and application, against max_connections."
    mutating = False
    backend = "the platform database"

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["database"])
        database(config, args[0])
        return {"database": args[0]}

    def locate(self, params: Params, config: Config) -> Plan | None:
        db = config.databases.get(str(params.get("database", "")))
        return None if db is None else database_plan(self.name, params["database"], db, params, mutating=False,
                                                       summary=f"db sessions {params['database']} (not read)")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        name = params["database"]
        db = database(ctx.config, name)
        seen = await ctx.databases.activity(name, budget=READ_BUDGET)
        summary, details, facts = describe(name, seen)
        return database_plan(self.name, name, db, params, mutating=False, summary=summary, details=tuple(details), facts=facts)


def describe(name: str, seen: Obj) -> tuple[str, list[str], dict[str, Any]]:
    groups: list[Obj] = list(seen.get("groups") or [])
    max_conn, reserved = int(seen.get("max_connections") or 0), int(seen.get("reserved") or 0)
    clients = [g for g in groups if g["backend_type"] == "client backend"]
    used = sum(g["n"] for g in clients) + 1  # + opsbot's own connection, which takes a slot while it looks
    here = [g for g in clients if g["here"]]
    here_total = sum(g["n"] for g in here) + 1
    states: Counter[str] = Counter()
    oldest: dict[str, float] = {}
    apps: dict[str, Counter[str]] = defaultdict(Counter)
    for g in here:
        state = g["state"] or "hidden"
        states[state] += g["n"]
        if g["oldest_seconds"] is not None:
            oldest[state] = max(oldest.get(state, 0.0), float(g["oldest_seconds"]))
        apps[g["application"] or "(no name)"][state] += g["n"]
    share = used / max_conn if max_conn else 0.0
    ordered = sorted(states, key=lambda s: (_STATE_ORDER.index(s) if s in _STATE_ORDER else len(_STATE_ORDER), s))
    by_state = ", ".join(f"{states[s]} {s}" + (f" (oldest {span(oldest[s])})" if s != "idle" and s in oldest else "")
                         for s in ordered) or "none besides opsbot's"
    summary = (f"{name}: {used} of {max_conn} connections in use ({share:.0%}); here: "
               + (", ".join(f"{states[s]} {s}" for s in ordered if s != "idle") or "nothing running"))
    details = [f"this database: {plural(here_total, 'connection')} — {by_state}, and opsbot's own"]
    others = sum(g["n"] for g in clients if not g["here"])
    if others:
        details.append(f"other databases on this server: {plural(others, 'client connection')}")
    system = sum(g["n"] for g in groups if g["backend_type"] != "client backend")
    if system:
        details.append(f"PostgreSQL's own processes (not counted against max_connections): {system}")
    top = sorted(apps.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    if top:
        shown = []
        for app, counts in top[:TOP_APPS]:
            parts = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: -counts[s]))
            shown.append(f"`{untrusted(app, 60)}` {sum(counts.values())} ({parts})")
        more = f"; {len(top) - TOP_APPS} more" if len(top) > TOP_APPS else ""
        details.append("top applications here: " + "; ".join(shown) + more)
    details.append(f"max_connections {max_conn}, {reserved} reserved for superusers: {max(0, max_conn - reserved - used)} "
                   "left for applications")
    if states.get("hidden"):
        hidden = states["hidden"]
        details.append(f"{plural(hidden, 'session')} of other roles {'shows' if hidden == 1 else 'show'} no state: "
                       "grant opsbot's database role `pg_read_all_stats` to see them")
    if max_conn and used >= WARN_SHARE * (max_conn - reserved):
        details.insert(0, f":warning: {used} of the {max_conn - reserved} connections applications may open are in use "
                          f"({used / max(1, max_conn - reserved):.0%}); new ones will soon be refused")
    if states.get("idle in transaction"):
        details.append(f"`/ops db queries {name}` shows the sessions idle in transaction and what they ran last")
    return summary, details, {"used": used, "max_connections": max_conn, "here": here_total,
                              "active": states.get("active", 0), "idle_in_transaction": states.get("idle in transaction", 0)}
