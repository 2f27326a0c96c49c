"""`/ops events <deployment>` — the recent Warning events of a deployment, its ReplicaSets and
its pods (what `kubectl describe` prints at the bottom of each), newest first. Read-only.

Events are listed once per namespace (``type=Warning``) and kept when their involved object is the
deployment, one of its ReplicaSets or pods — or, for pods already gone, a pod whose name the
deployment's ReplicaSets gave it (``<replicaset>-<suffix>``)."""

from __future__ import annotations

from bot.domain import Plan
from bot.messages import plural
from bot.ports import Context, Obj
from commands.base import OnDeployment, Params, age, deployment_alias
from commands.k8s.workload import pods_of, read_workload

MAX_SHOWN = 20


def _when(e: Obj) -> str:
    return str(e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp") or "")


class Events(OnDeployment):
    name = "events"
    words = ("events",)
    usage = "/ops events <deployment>"
    summary = "Recent warning events of a deployment, its ReplicaSets and pods, newest first."
    mutating = False

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        w = await read_workload(dep, ctx)
        pods = await pods_of(dep, w, ctx)
        uids = {w.uid} | {str(o["metadata"]["uid"]) for o in [*w.replicasets.values(), *pods]}
        rs_names = [str(rs["metadata"]["name"]) for rs in w.replicasets.values()]
        events = await ctx.kube.list_events(dep.environment, dep.namespace, field_selector="type=Warning")

        def ours(e: Obj) -> bool:
            inv = e.get("involvedObject") or {}
            if inv.get("uid") in uids:
                return True
            name, kind = str(inv.get("name") or ""), inv.get("kind")
            return (kind == "Deployment" and name == dep.name) or (kind == "ReplicaSet" and name in rs_names) or \
                (kind == "Pod" and any(name.startswith(r + "-") for r in rs_names))

        mine = sorted((e for e in events if ours(e)), key=_when, reverse=True)
        lines = []
        for e in mine[:MAX_SHOWN]:
            inv = e.get("involvedObject") or {}
            count = int(e.get("count") or 1)
            lines.append(f"{age(_when(e))} ago `{inv.get('kind')}/{inv.get('name')}` *{e.get('reason')}*"
                         + (f" ×{count}" if count > 1 else "") + f": {str(e.get('message') or '')[:300]}")
        if len(mine) > MAX_SHOWN:
            lines.append(f"…and {len(mine) - MAX_SHOWN} older")
        if not mine:
            lines.append("no warning events (the cluster keeps events for about an hour by default)")
        return self.deployment_plan(dep, params, summary=f"{dep.name}: {plural(len(mine), 'warning event')}", details=tuple(lines),
                                    facts={"events": len(mine)})
