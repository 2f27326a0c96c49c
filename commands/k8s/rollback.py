"""`/ops rollback <deployment> [--to-revision N]` — what `kubectl rollout undo` does.

Find the deployment's ReplicaSets (selector, then owner reference, as kubectl does), take the
previous revision (or N), and write its pod template back into the deployment with a JSON patch
that also carries the resourceVersion read just before: if anyone changed the deployment in
between, the API server answers 409 and nothing is written. The ``pod-template-hash`` label is
removed from the copied template, as kubectl does; the deployment controller then re-uses the old
ReplicaSet and gives it the next revision number (its old number goes into the ReplicaSet's
``deployment.kubernetes.io/revision-history``).

Rolling back twice. Right after a rollback, the "previous revision" is the one just rolled back
*from*: a second plain `/ops rollback` re-applies the bad template (that is what `kubectl rollout
undo` does). The revision history says so: the current ReplicaSet came back from an older number,
lower than the revision it would now go to. The card says it in words and suggests
``--to-revision`` with the revision before that.

Undo: back to the revision it replaced (``--to-revision <the revision it rolled back from>``), and
only while the deployment still runs the template the rollback put in and that revision still holds
the template it replaced.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

from bot.config import Config
from bot.domain import Outcome, Plan, Progress
from bot.errors import NotFound, Refused
from bot.ports import Context, Obj
from commands.base import Command, Inverse, Params, deployment_alias, images_of, typed
from commands.k8s.workload import follow_rollout, read_workload
from commands.k8s.workload import revision as _revision

REVISION_HISTORY = "deployment.kubernetes.io/revision-history"


def _history_of(rs: Obj | None) -> list[int]:
    """The revision numbers a ReplicaSet had before it was brought back by a rollback."""
    raw = ((rs or {}).get("metadata") or {}).get("annotations", {}).get(REVISION_HISTORY, "")
    return [int(h) for h in str(raw).split(",") if h.strip().isdigit()]


def _without_hash(template: Obj) -> Obj:
    t = copy.deepcopy(template)
    (t.get("metadata") or {}).get("labels", {}).pop("pod-template-hash", None)
    return t


class Rollback(Command):
    name = "rollback"
    words = ("rollback",)
    usage = "/ops rollback <deployment> [--to-revision N]"
    summary = "Roll a deployment back to its previous (or a given) revision, like `kubectl rollout undo`."
    flags = {"--to-revision": int}

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["deployment"])
        deployment_alias(config, args[0])
        to = flags.get("--to-revision")
        if to is not None and to < 1:
            raise self.usage_error("--to-revision takes a revision number (1 or more); see `/ops status` for the current one.")
        return {"deployment": args[0], "to_revision": to}

    async def _history(self, params: Params, ctx: Context) -> tuple[Obj, dict[int, Obj]]:
        w = await read_workload(deployment_alias(ctx.config, params["deployment"]), ctx)
        return w.deployment, w.replicasets

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        d, by_revision = await self._history(params, ctx)
        current = _revision(d)
        if d["spec"].get("paused"):
            raise Refused(f"{dep.name} is paused; resume it before rolling back (as `kubectl rollout undo` requires).")
        wanted = params.get("to_revision")
        if wanted is None:
            earlier = sorted(r for r in by_revision if r < current)
            if not earlier:
                raise Refused(f"{dep.name} has no revision before {current} to roll back to.")
            wanted = earlier[-1]
        if wanted == current:
            raise Refused(f"{dep.name} is already at revision {current}; nothing to do.")
        if wanted not in by_revision:
            known = ", ".join(str(r) for r in sorted(by_revision)) or "none"
            raise NotFound(f"{dep.name} has no revision {wanted}. Revisions kept: {known}.")
        target_template = by_revision[wanted]["spec"]["template"]
        if _without_hash(target_template) == _without_hash(d["spec"]["template"]):
            raise Refused(f"{dep.name}'s template already matches revision {wanted}; nothing to do.")
        current_images = images_of(d["spec"]["template"])
        target_images = images_of(target_template)
        details = [f"revisions kept: {', '.join(str(r) for r in sorted(by_revision))}"]
        reapplies = params.get("to_revision") is None and self._rolled_back_from(by_revision.get(current), wanted)
        if reapplies:
            details.insert(0, self._reapply_warning(params["deployment"], by_revision, current, wanted, target_images))
        return self.deployment_plan(
            dep, params,
            summary=f"{dep.name}: revision {current} ({', '.join(current_images)}) → {wanted} ({', '.join(target_images)})",
            details=tuple(details),
            before={"revision": current, "images": current_images},
            after={"revision": wanted, "images": target_images},
            facts={"revisions_back": sum(1 for r in by_revision if wanted < r <= current), "revision_from": current,
                   "revision_to": wanted, "reapplies_rolled_back": reapplies},
            observed={"generation": d["metadata"].get("generation"), "uid": d["metadata"]["uid"]},
        )

    @staticmethod
    def _rolled_back_from(current_rs: Obj | None, wanted: int) -> bool:
        """True when the current template came back (a rollback) from a revision older than
        ``wanted``: then ``wanted`` is the template that rollback replaced."""
        return any(h < wanted for h in _history_of(current_rs))

    @staticmethod
    def _reapply_warning(alias: str, by_revision: dict[int, Obj], current: int, wanted: int, images: list[str]) -> str:
        came_from = min(_history_of(by_revision.get(current)))
        older = sorted(r for r in by_revision if r < came_from)
        hint = (f"To go further back, use `/ops rollback {alias} --to-revision {older[-1]}`"
                if older else f"No revision older than {came_from} is kept; pick one with `--to-revision N`")
        return (f":warning: revision {wanted} ({', '.join(images)}) is the one that was just rolled back from: revision {current} "
                f"is revision {came_from}'s template brought back by a rollback. Rolling back again re-applies "
                f"{', '.join(images)} (that is what `kubectl rollout undo` does). {hint}.")

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        alias, back_to = original_plan["params"]["deployment"], int(original_plan["before"]["revision"])
        images = ", ".join(original_plan["before"].get("images") or [])
        return Inverse(text=typed("rollback", alias, "--to-revision", back_to),
                       why=f"{alias} back to revision {back_to} ({images}), the one it replaced")

    def moved_on(self, original_plan: dict[str, Any], fresh: Plan, request_id: str) -> str | None:
        alias, set_images = original_plan["params"]["deployment"], original_plan["after"].get("images")
        if fresh.before.get("images") != set_images:
            return (f"{alias} runs {', '.join(fresh.before.get('images') or [])} now, not the "
                    f"{', '.join(set_images or [])} that `{request_id}` rolled back to")
        if fresh.after.get("images") != original_plan["before"].get("images"):
            return (f"{alias}'s revision {fresh.after.get('revision')} holds {', '.join(fresh.after.get('images') or [])} now, "
                    f"not the {', '.join(original_plan['before'].get('images') or [])} that `{request_id}` replaced")
        return None

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        dep = deployment_alias(ctx.config, plan.params["deployment"])
        d, by_revision = await self._history(plan.params, ctx)
        wanted = int(plan.after["revision"])
        if _revision(d) != plan.before["revision"] or wanted not in by_revision:
            raise Refused(f"{dep.name} changed since the plan (now at revision {_revision(d)}).")
        template = _without_hash(by_revision[wanted]["spec"]["template"])
        result = await ctx.kube.replace_pod_template(
            dep.environment, dep.namespace, dep.name, template=template, resource_version=d["metadata"]["resourceVersion"],
        )
        return Outcome(
            ok=True,
            message=f"{dep.name} rolled back to the template of revision {wanted} ({', '.join(plan.after['images'])}); "
                    "the deployment controller records it as a new revision.",
            details={"from_revision": wanted, "generation": result["metadata"].get("generation")},
        )

    def follow(self, plan: Plan, outcome: Outcome, ctx: Context) -> AsyncIterator[Progress] | None:
        return follow_rollout(deployment_alias(ctx.config, plan.params["deployment"]), ctx)
