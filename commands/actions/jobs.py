"""A BullMQ job of an action (`kind: queue`, or a sql action's `enqueue:`), rendered from its templates."""

from __future__ import annotations

import json
from typing import Any

from bot.action_config import QueueJob, render_json, render_text
from bot.errors import Refused
from bot.ports import Context, Obj
from commands.shown import one_line, untrusted

QUEUED = ("waiting", "active", "delayed", "prioritized", "waiting-children", "paused")
FINISHED = ("completed", "failed")
MAX_DATA_BYTES = 64 * 1024


def render_job(job: QueueJob, values: dict[str, Any]) -> dict[str, Any]:
    """{"name", "data", "jobId", "opts"} with every template filled in; Refused when the id is one
    Node BullMQ refuses (an integer, or with ':') or the data is too big for a job."""
    job_id = render_text(job.job_id, values)
    name = render_text(job.name, values)
    if not job_id or ":" in job_id or job_id.isdigit() or len(job_id) > 200:
        raise Refused(f"the job id `{untrusted(job_id, 80)}` is not one BullMQ takes (not empty, not a whole number, "
                      "no `:`, at most 200 characters).")
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


async def add(ctx: Context, job: QueueJob, rendered: dict[str, Any], *, replace_finished: bool) -> str:
    return await ctx.queues.add_job(ctx.config.queues[job.queue], name=rendered["name"], data=rendered["data"],
                                    job_id=rendered["jobId"], replace_finished=replace_finished, opts=rendered["opts"])
