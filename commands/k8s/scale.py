"""`/ops scale <deployment> <replicas>` — `kubectl scale deploy/x --replicas=N`, within the range
the target's config allows, through the ``scale`` subresource guarded by resourceVersion."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from bot.config import Config
from bot.domain import Outcome, Plan, Progress
from bot.errors import Refused
from bot.ports import Context
from bot.untrusted import number_problem, whole_number
from commands.base import Command, Inverse, Params, deployment_alias, typed
from commands.k8s.workload import find_hpa, follow_rollout, hpa_line


class Scale(Command):
    name = "scale"
    words = ("scale",)
    usage = "/ops scale <deployment> <replicas>"
    summary = "Set a deployment's replica count (within its configured range)."

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["deployment", "replica count"])
        dep = deployment_alias(config, args[0])
        replicas = whole_number(args[1])
        if replicas is None:
            raise self.usage_error(number_problem(args[1], "replicas"))
        if not dep.replicas.min <= replicas <= dep.replicas.max:
            raise Refused(
                f"`{args[0]}` may run {dep.replicas.min} to {dep.replicas.max} replicas; {replicas} is outside that range. "
                f"Try `/ops scale {args[0]} {min(max(replicas, dep.replicas.min), dep.replicas.max)}`."
            )
        return {"deployment": args[0], "replicas": replicas}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        # The autoscaler is looked for while the deployment is read (two reads at once, not one after
        # the other: one cluster round trip less before the card); it is advisory and never raises.
        autoscaler = asyncio.ensure_future(find_hpa(dep, ctx))
        try:
            d = await ctx.kube.read_deployment(dep.environment, dep.namespace, dep.name)
            current = int((d.get("spec") or {}).get("replicas", 0))
            wanted = int(params["replicas"])
            if current == wanted:
                raise Refused(f"`{params['deployment']}` ({dep.namespace}/{dep.name}) already has {current} replicas; nothing to do.")
        except BaseException:
            autoscaler.cancel()
            raise
        details = [f"ready now: {(d.get('status') or {}).get('readyReplicas', 0)}"]
        hpa, problem = await autoscaler
        if problem:
            details.append(problem)
        if hpa is not None:
            low, high = int((hpa.get("spec") or {}).get("minReplicas", 1)), int(hpa["spec"]["maxReplicas"])
            details.append(f":warning: {hpa_line(hpa)}. The autoscaler owns the replica count and will "
                           + (f"put it back within {low}–{high} at once" if not low <= wanted <= high else "change it again as load moves")
                           + f". To change what it may do: "
                           f"`/ops hpa {params['deployment']} --min {min(wanted, low)} --max {max(wanted, high)}`.")
        return self.deployment_plan(
            dep, params,
            summary=f"{dep.name}: {current} → {wanted} replicas",
            details=tuple(details),
            before={"replicas": current},
            after={"replicas": wanted},
            facts={"replicas_before": current, "replicas_after": wanted},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        dep = deployment_alias(ctx.config, plan.params["deployment"])
        d = await ctx.kube.read_deployment(dep.environment, dep.namespace, dep.name)
        current = int((d.get("spec") or {}).get("replicas", 0))
        if current != plan.before["replicas"]:
            raise Refused(f"{dep.name} now has {current} replicas, not {plan.before['replicas']} as approved.")
        scale = await ctx.kube.scale_deployment(
            dep.environment, dep.namespace, dep.name,
            replicas=plan.after["replicas"], resource_version=d["metadata"]["resourceVersion"],
        )
        return Outcome(ok=True, message=f"{dep.name} scaled {current} → {scale['spec']['replicas']} replicas.",
                       details={"replicas": scale["spec"]["replicas"]})

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        alias, old = original_plan["params"]["deployment"], int(original_plan["before"]["replicas"])
        return Inverse(text=typed("scale", alias, old), why=f"{alias} back to {old} replicas")

    def moved_on(self, original_plan: dict[str, Any], fresh: Plan, request_id: str) -> str | None:
        alias, then, now = original_plan["params"]["deployment"], original_plan["after"]["replicas"], fresh.before["replicas"]
        return None if now == then else f"{alias} is at {now} replicas now, not the {then} that `{request_id}` set"

    def follow(self, plan: Plan, outcome: Outcome, ctx: Context) -> AsyncIterator[Progress] | None:
        return follow_rollout(deployment_alias(ctx.config, plan.params["deployment"]), ctx)
