"""`kind: sql` — one statement with bound, typed parameters on a configured database.

Plan: the optional read-only ``plan`` query (a READ ONLY transaction) is run with the parameters; its
rows are shown on the card and are the plan's ``before``, so the fingerprint covers them: when the
worker re-plans just before running and the rows differ, the request is stale and nothing runs.
Execute: the statement in one transaction under ``timeout``; a row count other than ``expect_rows``
rolls it back and says so. With ``enqueue:``, a BullMQ job is added before the commit (Redis down →
rolled back, nothing half-done): webhook replay, written as configuration.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from bot.action_config import ROW_PREFIX, PlanQuery, RowCount, SqlAction, json_strings, placeholders
from bot.domain import Outcome, Plan
from bot.errors import ExecutionError, OutcomeUnknown, Refused
from bot.messages import plural
from bot.ports import Context, Obj
from commands.actions import jobs
from commands.actions.base import ActionCommand
from commands.base import Params
from commands.shown import one_line, untrusted

ROWS_SHOWN = 10
PLAN_TIMEOUT = 1.5  # seconds: the card is due quickly; a plan query is a look, not a report


def plain(value: Any) -> Any:
    """A database value as the plan keeps it (JSON, compared by the stale check)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    return str(value)


def row_line(row: Obj) -> str:
    return one_line(", ".join(f"{k}={v}" for k, v in row.items()), 300)


def row_range(expect: int | RowCount) -> tuple[int, int]:
    return (expect, expect) if isinstance(expect, int) else (expect.min, expect.max)


def describe_rows(expect: int | RowCount) -> str:
    lo, hi = row_range(expect)
    return f"exactly {plural(lo, 'row')}" if lo == hi else f"{lo} to {plural(hi, 'row')}"


def bound(values: dict[str, Any], names: list[str]) -> str:
    return ", ".join(f"{n} = {one_line(repr(values[n]), 120)}" for n in dict.fromkeys(names) if n in values)


async def plan_rows(ctx: Context, database: str, query: PlanQuery, params: Params) -> list[Obj]:
    rows = await ctx.databases.action_rows(query.database or database, query.query, dict(params),
                                           max_rows=query.max_rows, timeout=PLAN_TIMEOUT)
    if len(rows) > query.max_rows:  # rows nobody would see on the card, nor the stale check compare
        raise Refused(f"the plan query found more than {query.max_rows} rows; a change to rows nobody sees is not asked "
                      "for. Narrow the values (or raise the action's `plan.max_rows`, at most 100).")
    return [{str(k): plain(v) for k, v in row.items()} for row in rows]


async def looked_at(ctx: Context, database: str, query: PlanQuery, params: Params, label: str) -> tuple[list[Obj], list[str]]:
    """A plan query's rows and the card's lines for them ("now: …", at most ``ROWS_SHOWN``); Refused when
    it found no row and the action requires one (nobody is asked to approve a no-op)."""
    rows = await plan_rows(ctx, database, query, params)
    if not rows and query.require_rows:
        raise Refused(f"nothing matches `{untrusted(label, 200)}`: the plan query found no row, so there is "
                      "nothing to do. Check the values.")
    lines = [f"now: {row_line(r)}" for r in rows[:ROWS_SHOWN]]
    if len(rows) > ROWS_SHOWN:
        lines.append(f"… and {plural(len(rows) - ROWS_SHOWN, 'more row')}")
    return rows, lines


class SqlCommand(ActionCommand):
    backend = "the platform database"

    async def plan(self, params: Params, ctx: Context) -> Plan:
        spec: SqlAction = self.spec
        values = self.variables(params, None, running=False)
        details = [f"database `{spec.database}`: `{one_line(spec.statement, 400)}`"
                   + (f" with {bound(values, placeholders(spec.statement))}" if placeholders(spec.statement) else ""),
                   f"expects {describe_rows(spec.expect_rows)}; anything else is rolled back"]
        before: dict[str, Any] = {}
        if spec.plan is not None:
            rows, lines = await looked_at(ctx, spec.database, spec.plan, params, self.label(params))
            details += lines
            # One row (the usual "this event", "this payout"): its columns, so a stale check says which one
            # changed ("last_error was …, now …"); several: the list.
            before.update(rows[0] if len(rows) == 1 else {"rows": rows})
        after: dict[str, Any] = {"statement": spec.statement, "rows": describe_rows(spec.expect_rows)}
        if spec.enqueue is not None:
            job = jobs.render_job(spec.enqueue, {**values, **{f"{ROW_PREFIX}{c}": f"<{c}>" for c in _row_refs(spec)}})
            details.append("then, before the commit, " + jobs.describe_job(ctx.config.queues[spec.enqueue.queue].name, job))
            after["job"] = {"queue": spec.enqueue.queue, "name": job["name"]}
        return self.skeleton(params, ctx.config, summary=f"{self.label(params)}: {spec.summary}", details=tuple(details),
                             before=before, after=after)

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        spec: SqlAction = self.spec
        values = self.variables(plan.params, ctx, running=True)
        added: list[str] = []

        async def enqueue(returned: list[Obj]) -> None:
            assert spec.enqueue is not None
            refs = _row_refs(spec)
            if refs and len(returned) != 1:
                raise ExecutionError(f"the statement returned {plural(len(returned), 'row')}; the job needs exactly one "
                                     "(rolled back, nothing changed).")
            row = returned[0] if returned else {}
            missing = [c for c in refs if c not in row]
            if missing:
                raise ExecutionError(f"the statement's RETURNING has no column {', '.join(missing)} (rolled back).")
            job = jobs.render_job(spec.enqueue, {**values, **{f"{ROW_PREFIX}{c}": plain(row[c]) for c in refs}})
            state = await jobs.add(ctx, spec.enqueue, job, replace_finished=True)
            added.append(f"job `{job['jobId']}` on `{ctx.config.queues[spec.enqueue.queue].name}` ({state})")

        try:
            count, _ = await ctx.databases.run_statement(spec.database, spec.statement, values, rows=row_range(spec.expect_rows),
                                                         timeout=spec.timeout, then=enqueue if spec.enqueue is not None else None)
        except OutcomeUnknown as exc:  # say what is known about the other half
            if added:
                raise OutcomeUnknown(f"{exc} The job was queued: {added[0]}.") from exc
            if spec.enqueue is not None and "while job" in str(exc):
                raise OutcomeUnknown(f"{exc} The statement was rolled back: no row was changed.") from exc
            raise
        message = f"{plural(count, 'row')} changed in database `{spec.database}`" + (f"; queued {added[0]}" if added else "") + "."
        return Outcome(ok=True, message=message, details={"rows": count, **({"job": added[0]} if added else {})})


def _row_refs(spec: SqlAction) -> list[str]:
    if spec.enqueue is None:
        return []
    names: list[str] = []
    for template in (spec.enqueue.name, spec.enqueue.job_id, *json_strings(spec.enqueue.data)):
        names += [n.removeprefix(ROW_PREFIX) for n in placeholders(template) if n.startswith(ROW_PREFIX)]
    return list(dict.fromkeys(names))
