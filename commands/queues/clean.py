"""`/ops queue clean <queue> --failed|--completed --older-than 7d [--limit 1000]` — remove finished
jobs that finished before a cutoff, oldest first, at most ``--limit`` (BullMQ ``Queue.clean``).

The cutoff is fixed when the request is planned (now − ``--older-than``) and kept in the plan's
parameters, so the re-check before execution and the clean itself use the same one: the jobs
removed are among those counted on the card (fewer if some were removed or retried meanwhile),
never jobs that only crossed the age while the request waited for approval.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bot.config import Config, parse_duration
from bot.domain import Outcome, Plan
from bot.errors import Refused
from bot.messages import plural
from bot.ports import Context
from commands.base import Params
from commands.queues.target import QueueCommand, ms_iso, now_ms, queue_alias

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MIN_AGE = 60  # seconds; "older than 0s" would be every finished job, including the one that just failed
MAX_AGE = 365 * 86400


class QueueClean(QueueCommand):
    name = "queue-clean"
    words = ("queue", "clean")
    usage = "/ops queue clean <queue> --failed|--completed --older-than 7d [--limit 1000]"
    summary = f"Remove a BullMQ queue's failed or completed jobs older than an age (at most --limit, max {MAX_LIMIT:,})."
    flags = {"--failed": bool, "--completed": bool, "--older-than": str, "--limit": int}

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.queue_arg(args, config, ["queue"])
        kinds = [k for k in ("failed", "completed") if flags.get(f"--{k}")]
        if len(kinds) != 1:
            raise self.usage_error("say which finished jobs to remove: `--failed` or `--completed` (one of them)."
                                   if not kinds else "give `--failed` or `--completed`, not both; clean one set at a time.")
        if "--older-than" not in flags:
            raise self.usage_error("`--older-than` is needed, e.g. `--older-than 7d`: only jobs finished before then are removed.")
        text = str(flags["--older-than"])
        try:
            seconds = parse_duration(text)
        except ValueError:
            raise self.usage_error(f"`--older-than` takes a duration such as 12h, 7d or 30d, got `{text[:40]}`.") from None
        if not MIN_AGE <= seconds <= MAX_AGE:
            raise self.usage_error(f"`--older-than` takes 1m to 365d, got `{text[:40]}`.")
        return {"queue": args[0], "state": kinds[0], "older_than": text, "older_than_seconds": seconds,
                "limit": self.limit_flag(flags, default=DEFAULT_LIMIT, most=MAX_LIMIT)}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        q = queue_alias(ctx.config, params["queue"])
        state, limit = str(params["state"]), int(params["limit"])
        cutoff = int(params.get("finished_before_ms") or now_ms() - int(params["older_than_seconds"]) * 1000)
        matching, counts = await asyncio.gather(ctx.queues.count_finished(q, state, finished_before_ms=cutoff),
                                                ctx.queues.job_counts(q))
        if not matching:
            raise Refused(f"queue `{params['queue']}` has no {state} job that finished before {ms_iso(cutoff)} "
                          f"(older than {params['older_than']}); nothing to do.")
        removing = min(matching, limit)
        details = [f"{plural(matching, f'{state} job')} finished before {ms_iso(cutoff)} (older than {params['older_than']})"
                   + (f"; the oldest {limit:,} are removed (`--limit`), the rest stay" if matching > limit else ""),
                   f"{max(counts[state] - removing, 0):,} of the queue's {plural(counts[state], f'{state} job')} remain; "
                   "removed jobs are gone for good (their data, reasons and logs)"]
        return self.queue_plan(
            {**params, "finished_before_ms": cutoff}, q,
            summary=f"{params['queue']}: remove {plural(removing, f'{state} job')} older than {params['older_than']}",
            details=tuple(details),
            observed={"finished_before_ms": cutoff, "state": state},
            after={"removed_at_most": removing},
            facts={"jobs": removing, "matching": matching},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        q = queue_alias(ctx.config, plan.params["queue"])
        state, cutoff = str(plan.params["state"]), int(plan.params["finished_before_ms"])
        removed = await ctx.queues.clean(q, state, finished_before_ms=cutoff, limit=int(plan.params["limit"]))
        counted = int(plan.facts.get("matching", 0))
        message = f"removed {plural(len(removed), f'{state} job')} of `{plan.params['queue']}` that finished before {ms_iso(cutoff)}"
        if len(removed) < min(counted, int(plan.params["limit"])):
            message += f" (fewer than the {counted:,} counted: the others were removed or retried meanwhile)"
        return Outcome(ok=True, message=message + ".", details={"removed": len(removed), "first_ids": removed[:10]})
