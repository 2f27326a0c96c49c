"""`/ops replay webhook <id>` — seed 003's manual replay, done safely.

In one transaction of the platform database: the event row must exist and be replayable
(``failed``/``pending`` by default); it is set back to ``pending`` with ``last_error`` cleared;
then a BullMQ job is added to the platform's queue (name ``process``, data from the row, jobId =
the event id so that two replays never make two jobs). The job is added before the commit: if
Redis refuses, the transaction rolls back and nothing is half-done.

A job id that still exists in the queue blocks a new job with the same id (BullMQ keeps
completed/failed jobs). When that old job is finished, the plan says so and it is replaced; when it
is still waiting or active, the event is already queued and the replay is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bot.config import Config, Webhooks
from bot.domain import Outcome, Plan
from bot.errors import NotFound, Refused
from bot.ports import Context, Obj
from commands.base import Command, Params
from commands.shown import one_line

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_QUEUED = ("waiting", "active", "delayed", "prioritized", "waiting-children")
_FINISHED = ("completed", "failed")


def render_job_data(template: Any, row: Obj) -> Any:
    """``{"eventId": "{id}"}`` → ``{"eventId": "8f2c…"}``; a string that is exactly one placeholder
    takes the column's value (as text for non-JSON types such as UUIDs and timestamps)."""
    if isinstance(template, dict):
        return {k: render_job_data(v, row) for k, v in template.items()}
    if isinstance(template, list):
        return [render_job_data(v, row) for v in template]
    if isinstance(template, str):
        m = _PLACEHOLDER.match(template)
        if m:
            if m.group(1) not in row:
                raise KeyError(m.group(1))
            value = row[m.group(1)]
            return value if isinstance(value, (int, float, bool, str)) or value is None else str(value)
    return template


def _spec(config: Config) -> Webhooks:
    if config.webhooks is None:
        raise Refused("webhook replay is not configured here (no `webhooks:` section in the config).")
    return config.webhooks


class ReplayWebhook(Command):
    name = "replay-webhook"
    words = ("replay", "webhook")
    usage = "/ops replay webhook <event-id>"
    summary = "Reset a failed webhook event to pending and queue it again (one job per event)."
    backend = "the platform database"

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["event id"])
        event_id = args[0]
        if len(event_id) > 200 or not event_id.isprintable():
            raise self.usage_error("that does not look like an event id.")
        _spec(config)
        return {"event_id": event_id}

    def locate(self, params: Params, config: Config) -> Plan | None:
        spec = _spec(config)
        return Plan(command=self.name, target=f"webhook/{spec.database}/{spec.table}/{params['event_id']}",
                    target_label=f"webhook event {params['event_id']}", environment=config.databases[spec.database].environment,
                    target_name="webhooks", target_kind="webhooks", params=params,
                    summary=f"replay webhook {params['event_id']} (not read)")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        spec = _spec(ctx.config)
        queue = ctx.config.queues[spec.queue]
        environment = ctx.config.databases[spec.database].environment
        row = await ctx.databases.webhook_event(spec, params["event_id"])
        if row is None:
            raise NotFound(f"no webhook event `{params['event_id']}` in {spec.table}. Check the id (the `{spec.id_column}` column).")
        status = str(row[spec.status_column])
        if status not in spec.replayable:
            raise Refused(f"event `{params['event_id']}` is `{status}`; only {', '.join(spec.replayable)} events can be replayed.")
        try:
            data = render_job_data(spec.job.data, row)
        except KeyError as exc:
            raise Refused(f"webhooks.job.data refers to column {exc} which {spec.table} does not have.") from None
        job_id = str(row[spec.id_column])
        job_state = await ctx.queues.job_state(queue, job_id)
        if job_state in _QUEUED:
            raise Refused(f"event `{job_id}` is already queued in `{queue.name}` (job state: {job_state}); nothing to do.")
        error = row.get(spec.error_column) if spec.error_column else None
        shown = one_line(json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str), 300)
        details = [f"queue `{queue.name}`: job `{spec.job.name}` with data `{shown}`, jobId `{job_id}`"]
        if job_state in _FINISHED:
            details.append(f"the previous job `{job_id}` ({job_state}) will be replaced")
        if error:
            details.append(f"last error: {str(error)[:300]}")
        return Plan(
            command=self.name,
            target=f"webhook/{spec.database}/{spec.table}/{job_id}",
            target_label=f"webhook event {job_id}",
            environment=environment,
            target_name="webhooks",
            target_kind="webhooks",
            params=params,
            summary=f"webhook {job_id}: {status} → {spec.reset_to}, queue job on {queue.name}",
            details=tuple(details),
            before={"status": status, "last_error": str(error)[:300] if error else None},
            after={"status": spec.reset_to, "job": {"name": spec.job.name, "data": data, "jobId": job_id}},
            observed={"job_state": job_state},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        spec = _spec(ctx.config)
        queue = ctx.config.queues[spec.queue]
        job = plan.after["job"]
        states: list[str] = []

        async def enqueue(row: Obj) -> None:
            data = render_job_data(spec.job.data, row)
            states.append(await ctx.queues.add_job(queue, name=job["name"], data=data, job_id=job["jobId"],
                                                   replace_finished=plan.observed.get("job_state") in _FINISHED))

        row = await ctx.databases.replay_webhook(spec, plan.params["event_id"], enqueue)
        if row is None:
            raise Refused(f"event `{plan.params['event_id']}` is no longer replayable (its status changed).")
        return Outcome(ok=True, message=f"webhook {job['jobId']} set to {spec.reset_to} and queued on `{queue.name}` "
                                        f"(job state: {states[0] if states else '?'}).",
                       details={"job_id": job["jobId"], "queue": queue.name})
