"""`/ops queue retry <queue> <job-id>` and `/ops queue retry-failed <queue> [--limit N]` — what
bull-board's Retry does (``Job.retry()``: a failed job moves back to waiting, its attempts so far
kept), for one job or for a bounded batch of the oldest failed ones.

A batch is bounded (10 by default, 100 at most: seed 002's retry storms come from retrying
everything at once) and exact: the plan lists the ids, so the card says which jobs, and the
fingerprint covers them, so when the set the plan would pick has changed by the time the request
runs (a job retried by hand, a new failure) the request is stale instead of retrying a set nobody
approved. Execution retries exactly those ids, each only if it is still failed, and reports each.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bot.config import Config
from bot.domain import Outcome, Plan
from bot.errors import BackendUnavailable, NotFound, OutcomeUnknown, Refused
from bot.messages import plural
from bot.ports import Context
from bot.untrusted import non_ascii_hint
from commands.base import Params
from commands.queues.target import QueueCommand, id_list, look_alike_warning, ms_age, queue_alias, shown

DEFAULT_BATCH = 10
MAX_BATCH = 100
KEPT_ATTEMPTS = "attempts made so far are kept, as bull-board's Retry does (a job with no attempts left fails at once if it fails again)"


def _paused_note(alias: str, paused: bool) -> list[str]:
    return [f":double_vertical_bar: the queue is paused: retried jobs wait until `/ops queue resume {alias}`"] if paused else []


class QueueRetry(QueueCommand):
    name = "queue-retry"
    words = ("queue", "retry")
    usage = "/ops queue retry <queue> <job-id>"
    summary = "Retry one failed job of a BullMQ queue (bull-board's Retry)."

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.queue_arg(args, config, ["queue", "job id"])
        return {"queue": args[0], "job_id": self.job_id_arg(args[1])}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        q = queue_alias(ctx.config, params["queue"])
        job_id = str(params["job_id"])
        job, paused = await asyncio.gather(ctx.queues.job(q, job_id), ctx.queues.is_paused(q))
        if job is None:
            raise NotFound(f"no job `{shown(job_id, 80)}` in queue `{params['queue']}`{non_ascii_hint(job_id[:80])}. "
                           f"`/ops queue failed {params['queue']}` lists the failed ones.")
        if job["state"] != "failed":
            raise Refused(f"job `{shown(job_id, 80)}` in `{params['queue']}` is {job['state']}, not failed; nothing to do.")
        details = [f"{shown(job['name'], 80)}: {plural(int(job['attemptsMade']), 'attempt')}, failed {ms_age(job['finishedOn'])} ago: "
                   f"{shown(job['failedReason'] or 'no reason recorded')}", KEPT_ATTEMPTS, *_paused_note(params["queue"], paused)]
        warning = look_alike_warning(job_id)
        if warning:
            details.insert(0, warning)
        return self.queue_plan(
            params, q,
            summary=f"{params['queue']}: retry failed job {shown(job_id, 80)} ({shown(job['name'], 80)})",
            details=tuple(details),
            before={"state": "failed", "attemptsMade": job["attemptsMade"], "finishedOn": job["finishedOn"]},
            after={"state": "waiting"},
            facts={"jobs": 1},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        q = queue_alias(ctx.config, plan.params["queue"])
        job_id = str(plan.params["job_id"])
        result = await ctx.queues.retry_job(q, job_id)
        if result != "retried":
            raise Refused(f"job `{shown(job_id, 80)}` is {result} now, no longer failed; nothing was done.")
        state = await ctx.queues.job_state(q, job_id)
        return Outcome(ok=True, message=f"job `{shown(job_id, 80)}` on `{plan.params['queue']}` moved from failed to waiting "
                                        f"(state now: {state or 'gone: already taken and finished'}).",
                       details={"job_id": job_id, "state": state})


class QueueRetryFailed(QueueCommand):
    name = "queue-retry-failed"
    words = ("queue", "retry-failed")
    usage = "/ops queue retry-failed <queue> [--limit 10]"
    summary = f"Retry the oldest failed jobs of a BullMQ queue, at most --limit (default {DEFAULT_BATCH}, max {MAX_BATCH})."
    flags = {"--limit": int}

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.queue_arg(args, config, ["queue"])
        return {"queue": args[0], "limit": self.limit_flag(flags, default=DEFAULT_BATCH, most=MAX_BATCH)}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        q = queue_alias(ctx.config, params["queue"])
        limit = int(params["limit"])
        jobs, counts, paused = await asyncio.gather(ctx.queues.jobs(q, "failed", count=limit, oldest_first=True),
                                                    ctx.queues.job_counts(q), ctx.queues.is_paused(q))
        if not jobs:
            raise Refused(f"queue `{params['queue']}` has no failed jobs; nothing to do.")
        ids = [str(j["id"]) for j in jobs]
        total = max(counts["failed"], len(ids))
        rest = total - len(ids)
        details = [f"oldest first: {id_list(ids)}",
                   (f"{plural(rest, 'newer failed job')} {'stays' if rest == 1 else 'stay'} failed" if rest
                    else "that is every failed job of the queue"),
                   KEPT_ATTEMPTS, *_paused_note(params["queue"], paused)]
        return self.queue_plan(
            params, q,
            summary=f"{params['queue']}: retry {len(ids)} of {plural(total, 'failed job')}",
            details=tuple(details),
            before={"failed_job_ids": ids},
            after={"state": "waiting"},
            facts={"jobs": len(ids)},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        q = queue_alias(ctx.config, plan.params["queue"])
        ids = [str(i) for i in plan.before["failed_job_ids"]]
        retried: list[str] = []
        skipped: dict[str, str] = {}
        for n, job_id in enumerate(ids):
            try:
                result = await ctx.queues.retry_job(q, job_id)
            except BackendUnavailable as exc:
                if n == 0:
                    raise
                # Some are retried; the one in flight may or may not be: say exactly what is known.
                raise OutcomeUnknown(
                    f"{exc} while retrying. Retried: {id_list(retried) or 'none'}; "
                    f"`{shown(job_id, 80)}`: unknown (Redis failed during the call); not tried: {id_list(ids[n + 1:]) or 'none'}"
                    + (f"; no longer failed: {', '.join(f'`{shown(i, 80)}` ({s})' for i, s in skipped.items())}" if skipped else "")
                    + f". Check `/ops queue failed {plan.params['queue']}` before retrying again.") from exc
            if result == "retried":
                retried.append(job_id)
            else:
                skipped[job_id] = result
        if not retried:
            which = "the job is" if len(ids) == 1 else f"none of the {len(ids)} jobs is"
            raise Refused(f"{which} failed any more ({', '.join(sorted(set(skipped.values())))}); nothing was done.")
        message = f"retried {len(retried)} of {plural(len(ids), 'failed job')} on `{plan.params['queue']}`: {id_list(retried)}"
        if skipped:
            message += "; no longer failed, left alone: " + ", ".join(f"`{shown(i, 80)}` ({s})" for i, s in list(skipped.items())[:10])
            if len(skipped) > 10:
                message += f" and {len(skipped) - 10} more"
        return Outcome(ok=True, message=message + ".", details={"retried": retried, "skipped": skipped})
