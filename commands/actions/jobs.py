"""A BullMQ job of an action (`kind: queue`, or a sql action's `enqueue:`), rendered from its templates."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bot.action_config import QueueJob, render_json, render_text
from bot.errors import BackendUnavailable, OutcomeUnknown, Refused
from bot.ports import Context, Obj
from commands.shown import one_line, untrusted

QUEUED = ("waiting", "active", "delayed", "prioritized", "waiting-children", "paused")
FINISHED = ("completed", "failed")
MAX_DATA_BYTES = 64 * 1024
BUDGET = 3.0  # seconds for one look at or add to a platform queue (the adapter's own timeouts are longer)


# The queue's own keys (`bull:<queue>:<suffix>`): a job id equal to one would write its hash over that
# key (BullMQ keeps a job at `bull:<queue>:<id>`) and break the queue for every later add.
RESERVED_IDS = frozenset({"wait", "active", "paused", "delayed", "prioritized", "completed", "failed", "meta", "events", "id",
                          "marker", "pc", "limiter", "stalled", "stalled-check", "repeat", "de", "waiting-children", "metrics"})


def render_job(job: QueueJob, values: dict[str, Any]) -> dict[str, Any]:
    """{"name", "data", "jobId", "opts"} with every template filled in; Refused when the id is one
    Node BullMQ refuses (an integer, or with ':') or the data is too big for a job."""
    job_id = render_text(job.job_id, values)
    name = render_text(job.name, values)
    if not job_id or ":" in job_id or job_id.isdigit() or len(job_id) > 200 or job_id.lower() in RESERVED_IDS:
        raise Refused(f"the job id `{untrusted(job_id, 80)}` is not one BullMQ takes (not empty, not a whole number, "
                      "no `:`, not one of the queue's own key names such as `meta` or `marker`, at most 200 characters).")
    if not name or len(name) > 200:
        raise Refused("the job name must have 1 to 200 characters.")
    data = render_json(job.data, values)
    if len(json.dumps(data, default=str)) > MAX_DATA_BYTES:
        raise Refused(f"the job's data would be over {MAX_DATA_BYTES // 1024} KiB; refusing.")
    opts: Obj = {"attempts": job.attempts}
    if job.backoff is not None:
        opts["backoff"] = {"type": job.backoff.type, "delay": job.backoff.delay * 1000}
    return {"name": name, "data": data, "jobId": job_id, "opts": opts}


def describe_job(queue: str, rendered: dict[str, Any]) -> str:
    data = one_line(json.dumps(rendered["data"], separators=(",", ":"), ensure_ascii=False, default=str), 300)
    tries = rendered["opts"]["attempts"]
    return (f"queue `{queue}`: job `{one_line(rendered['name'], 80)}` with data `{data}`, jobId "
            f"`{one_line(rendered['jobId'], 120)}`, {tries} attempt{'s' if tries != 1 else ''}")


async def state_of(ctx: Context, job: QueueJob, job_id: str) -> str | None:
    """The state of the job of that id, answered within ``BUDGET`` (BackendUnavailable otherwise)."""
    queue = ctx.config.queues[job.queue]
    try:
        async with asyncio.timeout(BUDGET):
            return await ctx.queues.job_state(queue, job_id)
    except TimeoutError:
        raise BackendUnavailable(f"Redis for queue {queue.name}", f"no answer within {BUDGET:g} s") from None


async def add(ctx: Context, job: QueueJob, rendered: dict[str, Any], *, replace_finished: bool) -> str:
    """Add the job within ``BUDGET``; no answer in time is an unknown outcome (it may have been added)."""
    queue = ctx.config.queues[job.queue]
    try:
        async with asyncio.timeout(BUDGET):
            return await ctx.queues.add_job(queue, name=rendered["name"], data=rendered["data"], job_id=rendered["jobId"],
                                            replace_finished=replace_finished, opts=rendered["opts"])
    except TimeoutError:
        raise OutcomeUnknown(f"Redis for queue {queue.name} did not answer within {BUDGET:g} s while job "
                             f"`{rendered['jobId']}` was being added: it may or may not be queued. Look at the queue "
                             f"(`/ops queue stats {job.queue}`) before trying again.") from None
