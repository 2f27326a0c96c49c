"""`/ops restart <deployment>` — what `kubectl rollout restart` does: stamp the pod template with
``kubectl.kubernetes.io/restartedAt`` (RFC 3339, as kubectl writes it), so the deployment controller
replaces every pod under the deployment's own rolling-update rules (maxSurge/maxUnavailable). The
patch carries the resourceVersion read just before, so a change in between is a 409, not a surprise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from bot.domain import Outcome, Plan, Progress
from bot.errors import Refused
from bot.ports import Context
from commands.base import Inverse, OnDeployment, Params, deployment_alias
from commands.k8s.workload import RESTARTED_AT, follow_rollout, revision


class Restart(OnDeployment):
    name = "restart"
    words = ("restart",)
    usage = "/ops restart <deployment>"
    summary = "Replace a deployment's pods one by one, like `kubectl rollout restart`."

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        return Inverse(why="a restart has no inverse: the old pods are gone and new ones run the same template; "
                           "there is nothing to put back")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        d = await ctx.kube.read_deployment(dep.environment, dep.namespace, dep.name)
        spec = d.get("spec") or {}
        if spec.get("paused"):
            raise Refused(f"{dep.name} is paused; a restart would not roll out until it is resumed "
                          "(`kubectl rollout restart` refuses it too).")
        replicas = int(spec.get("replicas", 0))
        if replicas == 0:
            raise Refused(f"{dep.name} has 0 replicas; there are no pods to restart. Scale it up instead.")
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        how = (f"rolling: maxSurge {rolling.get('maxSurge', '25%')}, maxUnavailable {rolling.get('maxUnavailable', '25%')}"
               if strategy.get("type", "RollingUpdate") == "RollingUpdate" else "Recreate: every pod stops before new ones start")
        last = ((spec.get("template") or {}).get("metadata") or {}).get("annotations", {}).get(RESTARTED_AT)
        return self.deployment_plan(
            dep, params,
            summary=f"{dep.name}: restart {'its 1 pod' if replicas == 1 else f'all {replicas} pods'}",
            details=(how,
                     f"last restart by annotation: {last or 'never'}", f"revision now: {revision(d)}"),
            before={"revision": revision(d), "restarted_at": last},
            after={"restarted": True},
            observed={"generation": d["metadata"].get("generation"), "uid": d["metadata"]["uid"]},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        dep = deployment_alias(ctx.config, plan.params["deployment"])
        d = await ctx.kube.read_deployment(dep.environment, dep.namespace, dep.name)
        if d["metadata"].get("generation") != plan.observed["generation"]:
            raise Refused(f"{dep.name} changed since the plan (generation {d['metadata'].get('generation')}).")
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        result = await ctx.kube.restart_deployment(dep.environment, dep.namespace, dep.name, restarted_at=stamp,
                                                   resource_version=d["metadata"]["resourceVersion"])
        return Outcome(ok=True, message=f"{dep.name} restart requested ({RESTARTED_AT}={stamp}); pods are replaced as the rollout goes.",
                       details={"restarted_at": stamp, "generation": result["metadata"].get("generation")})

    def follow(self, plan: Plan, outcome: Outcome, ctx: Context) -> AsyncIterator[Progress] | None:
        return follow_rollout(deployment_alias(ctx.config, plan.params["deployment"]), ctx)
