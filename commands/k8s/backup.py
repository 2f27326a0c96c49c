"""`/ops backup <cronjob>` — run a CronJob now: what `kubectl create job NAME --from=cronjob/X` does
(seed 003's "force a backup"). The Job is built as kubectl builds it — the CronJob's job template,
its labels and annotations plus ``cronjob.kubernetes.io/instantiate: manual``, and a controller
owner reference to the CronJob — and then followed in the thread until it completes or fails.

A CronJob with ``concurrencyPolicy: Forbid`` and a job still running is refused (the platform asked
for one at a time); with ``Allow``/``Replace`` the card says a job is already running. The plan is
stale when the CronJob's spec changed (its ``generation``), not when it merely ran on schedule.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from bot.config import Config, CronJob
from bot.domain import Outcome, Plan, Progress
from bot.errors import OpsbotError, Refused
from bot.ports import Context, Obj
from commands.base import Command, Params, age, images_of, named

POLL_SECONDS = 2.0
MAX_FOLLOW_SECONDS = 6 * 3600


def cronjob_alias(config: Config, alias: str) -> CronJob:
    return named(config.cronjobs, alias, "cronjob")


def job_from_cronjob(cronjob: Obj, name: str) -> Obj:
    template = (cronjob.get("spec") or {}).get("jobTemplate") or {}
    meta = template.get("metadata") or {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "annotations": {"cronjob.kubernetes.io/instantiate": "manual", **(meta.get("annotations") or {})},
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": cronjob["metadata"]["name"],
                                 "uid": cronjob["metadata"]["uid"], "controller": True}],
        },
        "spec": template.get("spec") or {},
    }


def job_state(job: Obj) -> tuple[str, bool, bool]:
    """(what it is doing, finished, failed) from the Job's conditions and counters."""
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "completed", True, False
        if c.get("type") in ("Failed", "FailureTarget"):
            return f"failed: {c.get('reason') or ''} {c.get('message') or ''}".strip(), True, True
    return (f"{status.get('active', 0)} running, {status.get('succeeded', 0)} succeeded, "
            f"{status.get('failed', 0)} failed"), False, False


def _ago(stamp: str | None) -> str:
    """A CronJob that never ran has no lastScheduleTime: say "never", not "? ago"."""
    return f"{age(stamp)} ago" if stamp else "never"


class Backup(Command):
    name = "backup"
    words = ("backup",)
    usage = "/ops backup <cronjob>"
    summary = "Run a CronJob now (e.g. a database backup), like `kubectl create job --from=cronjob/x`."

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["cronjob"])
        cronjob_alias(config, args[0])
        return {"cronjob": args[0]}

    def locate(self, params: Params, config: Config) -> Plan | None:
        cj = config.cronjobs.get(str(params.get("cronjob", "")))
        if cj is None:
            return None
        return self._plan(cj, params, summary=f"backup {params['cronjob']} (not read)")

    def _plan(self, cj: CronJob, params: Params, **fields: Any) -> Plan:
        return Plan(command=self.name, target=f"cronjob/{cj.environment}/{cj.namespace}/{cj.name}",
                    target_label=f"{params['cronjob']} ({cj.namespace}/{cj.name})", environment=cj.environment, params=params,
                    target_name=params["cronjob"], target_kind="cronjobs", **fields)

    async def plan(self, params: Params, ctx: Context) -> Plan:
        cj = cronjob_alias(ctx.config, params["cronjob"])
        obj = await ctx.kube.read_cronjob(cj.environment, cj.namespace, cj.name)
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        active = [str(a.get("name")) for a in status.get("active") or []]
        policy = spec.get("concurrencyPolicy", "Allow")
        if active and policy == "Forbid":
            raise Refused(f"{cj.name} already has a job running ({', '.join(active)}) and its concurrencyPolicy is Forbid; "
                          "wait for it to finish, then ask again.")
        pod_spec = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        details = [f"schedule `{spec.get('schedule')}`{' (suspended)' if spec.get('suspend') else ''}, concurrencyPolicy {policy}",
                   "images: " + (", ".join(images_of(pod_spec)) or "?"),
                   f"last scheduled {_ago(status.get('lastScheduleTime'))}, last succeeded "
                   f"{_ago(status.get('lastSuccessfulTime'))}"]
        if active:
            details.append(f":warning: already running: {', '.join(active)}")
        return self._plan(cj, params, summary=f"{cj.name}: run a job now from its template",
                          details=tuple(details), before={"active": len(active)}, after={"jobs": len(active) + 1},
                          observed={"uid": obj["metadata"]["uid"], "generation": obj["metadata"].get("generation")})

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        cj = cronjob_alias(ctx.config, plan.params["cronjob"])
        obj = await ctx.kube.read_cronjob(cj.environment, cj.namespace, cj.name)
        if obj["metadata"]["uid"] != plan.observed["uid"] or obj["metadata"].get("generation") != plan.observed["generation"]:
            raise Refused(f"{cj.name} changed since the plan (its spec was edited or it was re-created).")
        # kubectl leaves the name to the user; this one is unique per second and fits the 63-character limit.
        name = f"{cj.name[:44]}-manual-{datetime.now(UTC):%Y%m%d%H%M%S}"
        job = await ctx.kube.create_job(cj.environment, cj.namespace, job_from_cronjob(obj, name))
        return Outcome(ok=True, message=f"job {job['metadata']['name']} created from cronjob {cj.name}.",
                       details={"job": job["metadata"]["name"]})

    def follow(self, plan: Plan, outcome: Outcome, ctx: Context) -> AsyncIterator[Progress] | None:
        return self._follow(cronjob_alias(ctx.config, plan.params["cronjob"]), str(outcome.details["job"]), ctx)

    async def _follow(self, cj: CronJob, name: str, ctx: Context, *, poll: float = POLL_SECONDS) -> AsyncIterator[Progress]:
        loop = asyncio.get_running_loop()
        started, last, errors = loop.time(), "", 0
        while True:
            try:
                job = await ctx.kube.read_job(cj.environment, cj.namespace, name)
                errors = 0
            except OpsbotError as exc:
                errors += 1
                if errors >= 5:
                    yield Progress(text=f":warning: Stopped following job {name}: {exc}.", done=True, failed=True)
                    return
                await asyncio.sleep(poll)
                continue
            text, finished, failed = job_state(job)
            took = int(loop.time() - started)
            if finished:
                icon = ":rotating_light:" if failed else ":white_check_mark:"
                yield Progress(text=f"{icon} Job {name} {text} (after {took} s).", done=True, failed=failed)
                return
            limit = int((job.get("spec") or {}).get("activeDeadlineSeconds") or MAX_FOLLOW_SECONDS)
            if took > min(MAX_FOLLOW_SECONDS, limit + 60):
                yield Progress(text=f":rotating_light: Job {name} still not finished after {took} s ({text}); "
                                    "no longer following it.", done=True, failed=True)
                return
            if text != last and not last:
                yield Progress(text=f":hourglass_flowing_sand: Job {name}: {text}…")
                last = text
            await asyncio.sleep(poll)
