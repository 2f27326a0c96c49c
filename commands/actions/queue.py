"""`kind: queue` — add one BullMQ job (name, data, jobId, attempts/backoff) to a configured queue,
the way Node BullMQ's ``Queue.add`` does, so the platform's Node workers take it.

Plan: the job as it will be added. When the job id is known before running (it names only
parameters), the queue is asked about it: a job of that id still waiting or running means the work is
already queued (refused, nothing to do); a finished one is replaced (BullMQ would ignore the add) and
the card says so. The default id ``opsbot-{request_id}`` makes one job per request, so a retried
hand-over cannot add it twice.
"""

from __future__ import annotations

from typing import Any

from bot.action_config import RUN_ONLY_VARS, QueueAction, placeholders
from bot.domain import Outcome, Plan
from bot.errors import Refused
from bot.ports import Context
from commands.actions import jobs
from commands.actions.base import ActionCommand
from commands.base import Params
from commands.shown import one_line, untrusted


class QueueCommand(ActionCommand):
    backend = "the platform's Redis"

    def target_key(self, params: Params) -> str:
        return f"{super().target_key(params)}@queue/{self.spec.job.queue}"

    async def plan(self, params: Params, ctx: Context) -> Plan:
        spec: QueueAction = self.spec
        queue = ctx.config.queues[spec.job.queue]
        job = jobs.render_job(spec.job, self.variables(params, None, running=False))
        details = [jobs.describe_job(queue.name, job)]
        observed: dict[str, Any] = {}
        if not set(placeholders(spec.job.job_id)) & set(RUN_ONLY_VARS):
            state = await jobs.state_of(ctx, spec.job, job["jobId"])
            if state in jobs.QUEUED:
                raise Refused(f"job `{untrusted(job['jobId'], 120)}` is already in `{queue.name}` ({state}); nothing to do.")
            if state in jobs.FINISHED:
                details.append(f"the previous job `{one_line(job['jobId'], 120)}` ({state}) will be replaced")
            observed["job_state"] = state
        return self.skeleton(params, ctx.config, summary=f"{self.label(params)}: {spec.summary}", details=tuple(details),
                             after={"queue": spec.job.queue, "name": job["name"], "data": job["data"]}, observed=observed)

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        spec: QueueAction = self.spec
        queue = ctx.config.queues[spec.job.queue]
        job = jobs.render_job(spec.job, self.variables(plan.params, ctx, running=True))
        state = await jobs.add(ctx, spec.job, job, replace_finished=plan.observed.get("job_state") in jobs.FINISHED)
        return Outcome(ok=True, message=f"job `{job['jobId']}` added to `{queue.name}` (state: {state}).",
                       details={"job_id": job["jobId"], "queue": queue.name, "job_state": state})
