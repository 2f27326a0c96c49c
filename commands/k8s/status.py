"""`/ops status <deployment>`: replicas, revision, images and rollout condition. Read-only."""

from __future__ import annotations

from bot.domain import Plan
from bot.ports import Context
from commands.base import OnDeployment, Params, deployment_alias, images_of
from commands.k8s.workload import find_hpa, hpa_line

_AVAILABLE = {"True": "available", "False": "not available"}  # the Available condition's status (a string)


class Status(OnDeployment):
    name = "status"
    words = ("status",)
    usage = "/ops status <deployment>"
    summary = "Replicas, revision, images, rollout state and autoscaler of a deployment."
    mutating = False

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        d = await ctx.kube.read_deployment(dep.environment, dep.namespace, dep.name)
        spec, status = d.get("spec") or {}, d.get("status") or {}
        revision = (d["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", "?")
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        progressing = conditions.get("Progressing", {})
        available = conditions.get("Available", {})
        rollout = progressing.get("reason") or "unknown"
        if spec.get("paused"):
            rollout = "paused"
        details: tuple[str, ...] = (
            f"replicas: {spec.get('replicas', 0)} desired, {status.get('readyReplicas', 0)} ready, "
            f"{status.get('updatedReplicas', 0)} updated, {status.get('availableReplicas', 0)} available",
            f"revision: {revision}",
            "images: " + ", ".join(images_of(spec.get("template") or {})),
            f"rollout: {rollout} ({_AVAILABLE.get(str(available.get('status')), 'availability unknown')})"
            + (f" — {progressing['message']}" if progressing.get("message") else ""),
        )
        hpa, problem = await find_hpa(dep, ctx)
        line = hpa_line(hpa) or problem
        if line:
            details += (line,)
        return self.deployment_plan(
            dep, params,
            summary=f"{dep.name} in {dep.namespace} ({dep.environment})",
            details=details,
            before={"replicas": spec.get("replicas"), "revision": revision},
        )
