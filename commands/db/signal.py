"""`/ops db cancel <database> <pid>` / `/ops db terminate <database> <pid>` — ``pg_cancel_backend``
(the running query is cancelled, the session stays) / ``pg_terminate_backend`` (the session is
disconnected, its transaction rolled back). Mutating: through policy and approval.

The card shows the session: user, application, client, state, how long its query has run, and the
query (scrubbed, cut). What is approved is *that query of that session*: the fingerprint covers the
pid, ``backend_start`` (the pid of a session that ended can be reused by another one),
``query_start`` and a hash of the query's text. If by the time the worker runs it the session runs
another query, or the pid is another session, the request is stale and nothing is sent (the
worker's re-plan sees it; the execution reads the row again on the connection that sends the
signal, in the same transaction, right before sending it, and refuses there too).

Never signalled: a pid that is not a session of the database named, PostgreSQL's own processes
(``backend_type`` other than ``client backend``: autovacuum, WAL sender, …), sessions of superusers,
and opsbot's own connections (its ``application_name`` is ``opsbot``). ``cancel`` also needs a
running query (a session idle in transaction has none: terminate it instead).

opsbot's database role needs ``pg_signal_backend`` (and ``pg_read_all_stats`` to see other roles'
queries); PostgreSQL itself refuses to let it signal superusers.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, ClassVar

from bot.config import Config
from bot.domain import Outcome, Plan
from bot.errors import ExecutionError, NotFound, Refused, UserError
from bot.ports import Context, Obj
from bot.untrusted import number_problem, whole_number
from commands.base import Command, Params
from commands.db.common import PLAN_BUDGET, QUERY_SHOWN, SIGNAL_BUDGET, database, database_plan
from commands.shown import one_line, span

MAX_PID = 2**31 - 1
RUNNING = ("active", "fastpath function call")
OPSBOT_APPLICATION = "opsbot"


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else (None if value is None else str(value))


def identity(row: Obj) -> dict[str, Any]:
    """What an approval is for: this backend (pid + when it started) running this query (when it started + its text)."""
    return {"backend_start": _iso(row.get("backend_start")), "query_start": _iso(row.get("query_start")),
            "query_sha256": hashlib.sha256(str(row.get("query") or "").encode()).hexdigest()}


class _SignalSession(Command):
    terminate: ClassVar[bool]
    verb: ClassVar[str]
    function: ClassVar[str]
    effect: ClassVar[str]
    backend = "the platform database"

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["database", "pid"])
        database(config, args[0])
        pid = whole_number(args[1])
        if pid is None:
            raise self.usage_error(number_problem(args[1], "the pid") + f" `/ops db queries {args[0]}` lists the pids.")
        if not 1 <= pid <= MAX_PID:
            raise self.usage_error(f"the pid must be between 1 and {MAX_PID}, got {pid}.")
        return {"database": args[0], "pid": pid}

    def _target(self, params: Params) -> str:
        return f"db-session/{params['database']}/{params['pid']}"

    def _label(self, params: Params) -> str:
        return f"session {params['pid']} on database {params['database']}"

    def locate(self, params: Params, config: Config) -> Plan | None:
        db = config.databases.get(str(params.get("database", "")))
        if db is None:
            return None
        return database_plan(self.name, params["database"], db, params, mutating=True, target=self._target(params),
                             label=self._label(params), summary=f"{self.verb} pid {params['pid']} on {params['database']} (not read)")

    def refusal(self, row: Obj | None, params: Params) -> UserError | None:
        """Why this backend may not be signalled now, or None."""
        name, pid = params["database"], params["pid"]
        if row is None:
            return NotFound(f"no session with pid {pid} on the server of database `{name}` (it may have ended). "
                            f"`/ops db queries {name}` lists the running ones.")
        if row["backend_type"] != "client backend":
            return Refused(f"pid {pid} is PostgreSQL's own `{row['backend_type']}` process, not a client session; "
                           "opsbot does not signal those.")
        if not row["here"]:
            return Refused(f"pid {pid} is not connected to database `{name}`; opsbot signals only sessions of the database named.")
        if row["is_self"] or str(row["application_name"] or "").startswith(OPSBOT_APPLICATION):
            return Refused(f"pid {pid} is one of opsbot's own connections; opsbot does not signal itself.")
        if row["superuser"]:
            return Refused(f"pid {pid} belongs to superuser `{one_line(str(row['usename']), 60)}`; opsbot does not signal "
                           "superuser sessions (a DBA can, in psql).")
        if row["state"] is None:
            return Refused(f"opsbot cannot see what pid {pid} runs (its database role needs `pg_read_all_stats`), "
                           "so it cannot show it for approval.")
        if not self.terminate and row["state"] not in RUNNING:
            hint = (f" `/ops db terminate {name} {pid}` ends the session and rolls its transaction back."
                    if str(row["state"]).startswith("idle in transaction") else "")
            return Refused(f"pid {pid} is {row['state']}: there is no running query to cancel.{hint}")
        return None

    async def plan(self, params: Params, ctx: Context) -> Plan:
        name, pid = params["database"], params["pid"]
        db = database(ctx.config, name)
        row = await ctx.databases.session(name, pid, budget=PLAN_BUDGET)
        problem = self.refusal(row, params)
        if problem is not None:
            raise problem
        assert row is not None
        user, app = str(row["usename"] or "?"), str(row["application_name"] or "")
        query = one_line(str(row["query"] or ""), QUERY_SHOWN)
        wait = f", waiting on {row['wait_event_type']}/{row['wait_event']}" if row.get("wait_event") and row["state"] == "active" else ""
        return database_plan(
            self.name, name, db, params, mutating=True, target=self._target(params), label=self._label(params),
            summary=f"{self.verb} pid {pid} on {name}: {one_line(user, 60)} / {one_line(app or '(no name)', 60)}, "
                    f"{row['state']} for {span(row['query_seconds'])}",
            details=(f"session {pid}: user `{one_line(user, 60)}`, application `{one_line(app or '(no name)', 60)}`, "
                     f"client {row['client'] or 'local socket'}, connected {span(row['backend_seconds'])} ago",
                     f"state {row['state']}{wait}; its query started {span(row['query_seconds'])} ago",
                     f"query: `{query}`",
                     f"`{self.function}`: {self.effect}",
                     "if the session runs another query by the time this is approved (or the pid is another session), "
                     "nothing is sent: the request ends as stale"),
            before={"pid": pid, "user": user, "application": app, "query": query},
            after={"signal": self.function},
            observed=identity(row),
            facts={"query_seconds": int(row["query_seconds"] or 0)},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        params = plan.params
        name, pid = params["database"], params["pid"]

        def still(row: Obj | None) -> None:
            problem = self.refusal(row, params)
            if problem is not None:
                raise problem
            assert row is not None
            now = identity(row)
            if now != plan.observed:
                what = "is another session now" if now["backend_start"] != plan.observed.get("backend_start") \
                    else "runs another query now"
                raise Refused(f"session {pid} {what} (it changed after approval); nothing was sent.")

        result = await ctx.databases.signal_session(name, pid, terminate=self.terminate, still=still, budget=SIGNAL_BUDGET)
        if not result["sent"]:
            raise ExecutionError(f"PostgreSQL did not signal pid {pid} (`{self.function}` returned false: it had just ended?).")
        if self.terminate:
            message = (f"session {pid} on {name} terminated." if result["ended"] else
                       f"terminate sent to session {pid} on {name}; it was still there 2 s later (`/ops db sessions {name}`).")
        else:
            message = (f"query of session {pid} on {name} cancelled." if result["ended"] else
                       f"cancel sent to session {pid} on {name}; its query was still running 2 s later (it may be in a step "
                       f"that cannot be interrupted; `/ops db queries {name}` shows it).")
        return Outcome(ok=True, message=message, details={"pid": pid, "signal": self.function, "ended": result["ended"]})


class DbCancel(_SignalSession):
    name = "db-cancel"
    words = ("db", "cancel")
    usage = "/ops db cancel <database> <pid>"
    summary = "Cancel a session's running query (pg_cancel_backend); the card shows the session and its query."
    terminate = False
    verb = "cancel the query of"
    function = "pg_cancel_backend"
    effect = "the running query is cancelled (its transaction is aborted); the session stays connected"


class DbTerminate(_SignalSession):
    name = "db-terminate"
    words = ("db", "terminate")
    usage = "/ops db terminate <database> <pid>"
    summary = "Disconnect a session (pg_terminate_backend), rolling back its open transaction."
    terminate = True
    verb = "terminate"
    function = "pg_terminate_backend"
    effect = "the session is disconnected and its open transaction rolled back"
