"""`/ops hpa <deployment> [--min N] [--max M]` — change the bounds of the HorizontalPodAutoscaler
that owns a deployment's replica count. When an HPA exists, `scale` is undone by it within seconds;
this is the change that sticks. Both bounds stay inside the range the config allows the deployment
(``deployments.<alias>.replicas``), the same range `scale` is held to. The patch carries the
resourceVersion read at execution, so a concurrent edit of the HPA is a 409, not an overwrite.
"""

from __future__ import annotations

from typing import Any

from bot.config import Config
from bot.domain import Outcome, Plan
from bot.errors import NotFound, Refused
from bot.ports import Context, Obj
from commands.base import Command, Inverse, Params, deployment_alias, typed
from commands.k8s.workload import hpa_line


def _bounds(hpa: Obj) -> tuple[int, int]:
    spec = hpa.get("spec") or {}
    return int(spec.get("minReplicas", 1)), int(spec["maxReplicas"])


class Hpa(Command):
    name = "hpa"
    words = ("hpa",)
    usage = "/ops hpa <deployment> [--min N] [--max M]"
    summary = "Change the min/max replicas of a deployment's autoscaler (what `scale` cannot override)."
    flags = {"--min": int, "--max": int}

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["deployment"])
        dep = deployment_alias(config, args[0])
        low, high = flags.get("--min"), flags.get("--max")
        if low is None and high is None:
            raise self.usage_error(f"say what to change: `/ops hpa {args[0]} --min 2 --max 10` (either or both).")
        allowed = dep.replicas
        for flag, value in (("--min", low), ("--max", high)):
            if value is not None and not max(1, allowed.min) <= value <= allowed.max:
                raise Refused(f"`{flag}` for `{args[0]}` must be {max(1, allowed.min)} to {allowed.max} "
                              f"(the range the config allows it), got {value}.")
        if low is not None and high is not None and low > high:
            raise self.usage_error(f"`--min` ({low}) is above `--max` ({high}).")
        return {"deployment": args[0], "min": low, "max": high}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        hpa = await ctx.kube.find_hpa(dep.environment, dep.namespace, dep.name)
        if hpa is None:
            raise NotFound(f"{dep.name} has no HorizontalPodAutoscaler; its replica count is set with "
                           f"`/ops scale {params['deployment']} N`.")
        low, high = _bounds(hpa)
        new_low = low if params.get("min") is None else int(params["min"])
        new_high = high if params.get("max") is None else int(params["max"])
        if new_low > new_high:
            raise Refused(f"that would make min {new_low} above max {new_high}; give both, e.g. "
                          f"`/ops hpa {params['deployment']} --min {min(new_low, new_high)} --max {max(new_low, new_high)}`.")
        if (new_low, new_high) == (low, high):
            raise Refused(f"{hpa['metadata']['name']} already allows {low}–{high} replicas; nothing to do.")
        current = int((hpa.get("status") or {}).get("currentReplicas") or 0)
        effect = ""
        if current and not new_low <= current <= new_high:
            effect = f"the autoscaler will move {dep.name} from {current} to {min(max(current, new_low), new_high)} replicas at once"
        return self.deployment_plan(
            dep, params,
            summary=f"{hpa['metadata']['name']}: {low}–{high} → {new_low}–{new_high} replicas",
            details=tuple(d for d in (hpa_line(hpa), effect) if d),
            before={"min": low, "max": high},
            after={"min": new_low, "max": new_high},
            facts={"replicas_after": new_high},  # `when: replicas_above` weighs the new ceiling
            observed={"hpa": hpa["metadata"]["name"], "uid": hpa["metadata"].get("uid")},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        dep = deployment_alias(ctx.config, plan.params["deployment"])
        hpa = await ctx.kube.find_hpa(dep.environment, dep.namespace, dep.name)
        if hpa is None or hpa["metadata"].get("uid") != plan.observed["uid"]:
            raise Refused(f"{dep.name}'s autoscaler is gone or was replaced since the plan.")
        if _bounds(hpa) != (plan.before["min"], plan.before["max"]):
            raise Refused(f"{hpa['metadata']['name']} now allows {'–'.join(map(str, _bounds(hpa)))}, not "
                          f"{plan.before['min']}–{plan.before['max']} as approved.")
        result = await ctx.kube.patch_hpa_bounds(dep.environment, dep.namespace, str(hpa["metadata"]["name"]),
                                                 min_replicas=int(plan.after["min"]), max_replicas=int(plan.after["max"]),
                                                 resource_version=str(hpa["metadata"]["resourceVersion"]))
        got = _bounds(result)
        return Outcome(ok=True, message=f"{hpa['metadata']['name']} now allows {got[0]}–{got[1]} replicas.",
                       details={"min": got[0], "max": got[1]})

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        alias, before = original_plan["params"]["deployment"], original_plan["before"]
        low, high = int(before["min"]), int(before["max"])
        return Inverse(text=typed("hpa", alias, "--min", low, "--max", high), why=f"{alias}'s autoscaler back to {low}–{high} replicas")

    def moved_on(self, original_plan: dict[str, Any], fresh: Plan, request_id: str) -> str | None:
        after, now = original_plan["after"], fresh.before
        if (now["min"], now["max"]) == (after["min"], after["max"]):
            return None
        return (f"{original_plan['params']['deployment']}'s autoscaler allows {now['min']}–{now['max']} replicas now, not the "
                f"{after['min']}–{after['max']} that `{request_id}` set")
