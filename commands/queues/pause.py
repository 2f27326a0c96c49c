"""`/ops queue pause <queue>` / `/ops queue resume <queue>` — bull-board's Pause and Resume: the
queue's ``paused`` flag, which every BullMQ worker (Python or Node) checks before it takes a job.
Pausing lets the active jobs finish and starts no new one; resuming lets workers take jobs again.
A queue already in the wanted state is refused: nothing to do."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.config import Config
from bot.domain import Outcome, Plan
from bot.errors import Refused
from bot.messages import plural
from bot.ports import Context
from commands.base import Inverse, Params, typed
from commands.queues.target import QueueCommand, queue_alias


class _SetPaused(QueueCommand):
    paused: bool  # what the command makes the queue

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.queue_arg(args, config, ["queue"])
        return {"queue": args[0]}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        q = queue_alias(ctx.config, params["queue"])
        paused, counts = await asyncio.gather(ctx.queues.is_paused(q), ctx.queues.job_counts(q))
        if paused == self.paused:
            raise Refused(f"queue `{params['queue']}` is already {'paused' if paused else 'running (not paused)'}; nothing to do.")
        waiting = counts["waiting"] + counts["paused"] + counts["prioritized"]
        if self.paused:
            summary = f"{params['queue']}: pause (workers take no new job)"
            details = [f"{plural(counts['active'], 'active job')} {'runs' if counts['active'] == 1 else 'run'} to the end; "
                       f"{plural(waiting, 'waiting job')} and {plural(counts['delayed'], 'delayed job')} wait until "
                       f"`/ops queue resume {params['queue']}`"]
        else:
            summary = f"{params['queue']}: resume (workers take jobs again)"
            details = [f"{plural(waiting, 'waiting job')} will be taken"]
        return self.queue_plan(params, q, summary=summary, details=tuple(details),
                               before={"paused": paused}, after={"paused": self.paused}, facts={"waiting": waiting})

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        q = queue_alias(ctx.config, plan.params["queue"])
        if await ctx.queues.is_paused(q) != plan.before["paused"]:
            raise Refused(f"queue `{plan.params['queue']}` is already {'paused' if self.paused else 'running'}; nothing was done.")
        await ctx.queues.set_paused(q, self.paused)
        now = await ctx.queues.is_paused(q)
        return Outcome(ok=True, message=f"queue `{plan.params['queue']}` {'paused' if now else 'resumed'}"
                                        + (": workers take no new job." if now else ": workers take jobs again."),
                       details={"paused": now})

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        queue, verb = original_plan["params"]["queue"], "resume" if self.paused else "pause"
        return Inverse(text=typed("queue", verb, queue), why=f"{verb} queue {queue} again")


class QueuePause(_SetPaused):
    name = "queue-pause"
    words = ("queue", "pause")
    usage = "/ops queue pause <queue>"
    summary = "Pause a BullMQ queue: workers finish their active jobs and take no new one."
    paused = True


class QueueResume(_SetPaused):
    name = "queue-resume"
    words = ("queue", "resume")
    usage = "/ops queue resume <queue>"
    summary = "Resume a paused BullMQ queue."
    paused = False
