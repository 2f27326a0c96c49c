"""`/ops queue failed <queue> [--limit 10]` — the latest failed jobs, as bull-board's Failed tab lists
them: id, name, attempts made, the failed reason (one line, scrubbed of secrets, cut at 200
characters) and when it failed. Read-only; never the jobs' data (it can hold personal data)."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.config import Config
from bot.domain import Plan
from bot.messages import plural
from bot.ports import Context
from commands.base import Params
from commands.queues.target import QueueCommand, ms_age, queue_alias, shown

DEFAULT_LIMIT = 10
MAX_LIMIT = 50


class QueueFailed(QueueCommand):
    name = "queue-failed"
    words = ("queue", "failed")
    usage = "/ops queue failed <queue> [--limit 10]"
    summary = "The latest failed jobs of a BullMQ queue: id, name, attempts, failed reason (scrubbed), when."
    mutating = False
    flags = {"--limit": int}

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.queue_arg(args, config, ["queue"])
        return {"queue": args[0], "limit": self.limit_flag(flags, default=DEFAULT_LIMIT, most=MAX_LIMIT)}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        q = queue_alias(ctx.config, params["queue"])
        limit = int(params["limit"])
        counts, jobs = await asyncio.gather(ctx.queues.job_counts(q),
                                            ctx.queues.jobs(q, "failed", count=limit, oldest_first=False))
        total = counts["failed"]
        details = [f"`{shown(j['id'], 80)}` {shown(j['name'], 80)} — {plural(int(j['attemptsMade']), 'attempt')}, failed "
                   f"{ms_age(j['finishedOn'])} ago: {shown(j['failedReason'] or 'no reason recorded')}" for j in jobs]
        if total > len(jobs):
            details.append(f"{plural(total - len(jobs), 'older failed job')} not shown" + (f"; `--limit {MAX_LIMIT}` shows more"
                                                                                    if limit < MAX_LIMIT else ""))
        if jobs:
            details.append(f"retry one: `/ops queue retry {params['queue']} <job-id>`; the oldest ones: "
                           f"`/ops queue retry-failed {params['queue']} --limit N`")
        newest = f", the latest {len(jobs)} shown" if jobs and total > len(jobs) else ""
        return self.queue_plan(params, q, summary=f"{params['queue']}: {plural(total, 'failed job')}{newest}", details=tuple(details),
                               facts={"failed": total, "shown": len(jobs)})
