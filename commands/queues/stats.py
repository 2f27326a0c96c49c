"""`/ops queue stats <queue>` — what bull-board's queue page shows at the top: how many jobs are in
each state, whether the queue is paused, and how long the next job has been waiting. Read-only."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.config import Config
from bot.domain import Plan
from bot.ports import Context
from commands.base import Params
from commands.queues.target import QueueCommand, ms_age, queue_alias, shown

SHOWN_STATES = ("waiting", "active", "delayed", "failed", "completed", "paused")
SHOWN_WHEN_SOME = ("prioritized", "waiting-children")


class QueueStats(QueueCommand):
    name = "queue-stats"
    words = ("queue", "stats")
    usage = "/ops queue stats <queue>"
    summary = "A BullMQ queue's job counts by state, whether it is paused, and the oldest waiting job's age."
    mutating = False

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.queue_arg(args, config, ["queue"])
        return {"queue": args[0]}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        q = queue_alias(ctx.config, params["queue"])
        counts, paused, oldest = await asyncio.gather(ctx.queues.job_counts(q), ctx.queues.is_paused(q),
                                                      ctx.queues.oldest_waiting(q))
        waiting = counts["waiting"] + counts["paused"] + counts["prioritized"]
        state = "paused" if paused else "running"
        # `paused` counts the queue's paused list: Node BullMQ's pause moves the wait list there,
        # the Python bullmq opsbot uses leaves the jobs in wait; both set the flag workers honour.
        details = [" · ".join([*(f"{s} {counts[s]:,}" for s in SHOWN_STATES),
                               *(f"{s} {counts[s]:,}" for s in SHOWN_WHEN_SOME if counts[s])])]
        if paused:
            details.append(f":double_vertical_bar: paused: workers take no new job until `/ops queue resume {params['queue']}` "
                           f"({waiting:,} waiting)")
        else:
            details.append("not paused")
        if oldest is not None:
            details.append(f"oldest waiting job: `{shown(oldest['id'], 80)}` ({shown(oldest['name'], 80)}), "
                           f"added {ms_age(oldest['timestamp'])} ago")
        elif waiting:
            details.append("no job is in the wait list (the waiting ones are prioritized)")
        else:
            details.append("no job is waiting")
        return self.queue_plan(
            params, q,
            summary=f"{params['queue']}: {state}, {waiting:,} waiting, {counts['active']:,} active, {counts['failed']:,} failed",
            details=tuple(details),
            facts={"counts": counts, "paused": paused,
                   "oldest_waiting_ms": oldest["timestamp"] if oldest is not None else None},
        )
