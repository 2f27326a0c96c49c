"""`/ops history <deployment>` — the revisions `kubectl rollout history` lists, with what
`rollout history` leaves out: each revision's images and age, and which one is current. Read-only."""

from __future__ import annotations

from bot.domain import Plan
from bot.messages import plural
from bot.ports import Context
from commands.base import OnDeployment, Params, age, deployment_alias, images_of
from commands.k8s.workload import CHANGE_CAUSE, read_workload, revision

MAX_SHOWN = 15


class History(OnDeployment):
    name = "history"
    words = ("history",)
    usage = "/ops history <deployment>"
    summary = "A deployment's revisions: images, change-cause and age, the current one marked."
    mutating = False

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        w = await read_workload(dep, ctx)
        current = revision(w.deployment)
        lines = []
        for rev in sorted(w.replicasets, reverse=True)[:MAX_SHOWN]:
            rs = w.replicasets[rev]
            cause = (rs["metadata"].get("annotations") or {}).get(CHANGE_CAUSE) or "<none>"
            mark = " ← current" if rev == current else ""
            lines.append(f"`{rev}` {', '.join(images_of(rs['spec']['template']))} — {cause} — "
                         f"{age(rs['metadata'].get('creationTimestamp'))} old{mark}")
        if len(w.replicasets) > MAX_SHOWN:
            lines.append(f"…and {plural(len(w.replicasets) - MAX_SHOWN, 'older revision')}")
        if not lines:
            lines.append("no ReplicaSets found for it (revisionHistoryLimit 0, or it never rolled out)")
        older = [r for r in w.replicasets if r < current]
        if older:
            lines.append(f"Roll back with `/ops rollback {params['deployment']}` (to {max(older)}) or "
                         f"`/ops rollback {params['deployment']} --to-revision N`.")
        return self.deployment_plan(dep, params, summary=f"{dep.name}: {plural(len(w.replicasets), 'revision')}, current {current}",
                                    details=tuple(lines), before={"revision": current})
