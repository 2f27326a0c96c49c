"""What several Kubernetes commands read the same way: a deployment's ReplicaSets (its revision
history), its pods, its HorizontalPodAutoscaler, and where its rollout stands.

ReplicaSets and pods are found as kubectl finds them: by the deployment's label selector, then kept
only if their controller owner reference is the deployment (or one of its ReplicaSets), so that a
second deployment with overlapping labels is never mistaken for this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bot.config import Deployment
from bot.domain import Progress
from bot.errors import OpsbotError
from bot.ports import Context, Obj
from commands.base import match_labels_selector

REVISION = "deployment.kubernetes.io/revision"
CHANGE_CAUSE = "kubernetes.io/change-cause"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


def revision(obj: Obj) -> int:
    try:
        return int((obj["metadata"].get("annotations") or {}).get(REVISION, "0"))
    except ValueError:
        return 0


def _controlled_by(obj: Obj, uids: set[str]) -> bool:
    return any(o.get("uid") in uids and o.get("controller") for o in obj["metadata"].get("ownerReferences") or [])


@dataclass(frozen=True)
class Workload:
    deployment: Obj
    replicasets: dict[int, Obj]  # by revision

    @property
    def selector(self) -> str:
        return match_labels_selector(self.deployment["spec"]["selector"])

    @property
    def uid(self) -> str:
        return str(self.deployment["metadata"]["uid"])


async def read_workload(dep: Deployment, ctx: Context) -> Workload:
    d = await ctx.kube.read_deployment(dep.environment, dep.namespace, dep.name)
    selector = match_labels_selector(d["spec"]["selector"])
    owned = [rs for rs in await ctx.kube.list_replicasets(dep.environment, dep.namespace, selector)
             if _controlled_by(rs, {d["metadata"]["uid"]})]
    return Workload(deployment=d, replicasets={revision(rs): rs for rs in owned})


async def pods_of(dep: Deployment, workload: Workload, ctx: Context) -> list[Obj]:
    rs_uids = {str(rs["metadata"]["uid"]) for rs in workload.replicasets.values()}
    pods = await ctx.kube.list_pods(dep.environment, dep.namespace, workload.selector)
    return sorted((p for p in pods if _controlled_by(p, rs_uids)), key=lambda p: str(p["metadata"]["name"]))


async def find_hpa(dep: Deployment, ctx: Context) -> tuple[Obj | None, str | None]:
    """The deployment's autoscaler, or why it could not be read. Advisory for the commands that
    show it, so a failed read is said on the answer or card instead of refusing the command."""
    try:
        return await ctx.kube.find_hpa(dep.environment, dep.namespace, dep.name), None
    except OpsbotError as exc:
        return None, f":warning: could not check for an autoscaler: {exc}"


def hpa_line(hpa: Obj | None) -> str | None:
    """The HPA as one line: bounds, current/desired replicas and each metric's target."""
    if hpa is None:
        return None
    spec, status = hpa.get("spec") or {}, hpa.get("status") or {}
    targets = []
    for m in spec.get("metrics") or []:
        if m.get("type") == "Resource":
            r = m.get("resource") or {}
            t = r.get("target") or {}
            want = f"{t['averageUtilization']}%" if "averageUtilization" in t else str(t.get("averageValue") or t.get("value") or "?")
            now = "?"
            for cm in status.get("currentMetrics") or []:
                cr = cm.get("resource") or {}
                if cr.get("name") == r.get("name"):
                    cur = cr.get("current") or {}
                    now = f"{cur['averageUtilization']}%" if "averageUtilization" in cur else str(cur.get("averageValue") or "?")
            targets.append(f"{r.get('name')} {now}/{want}")
        else:
            targets.append(str(m.get("type")))
    return (f"autoscaler {hpa['metadata']['name']}: {spec.get('minReplicas', 1)}–{spec.get('maxReplicas')} replicas, "
            f"current {status.get('currentReplicas', '?')}, desired {status.get('desiredReplicas', '?')}"
            + (f", targets {', '.join(targets)}" if targets else ""))


@dataclass(frozen=True)
class RolloutState:
    text: str
    done: bool
    failed: bool


def rollout_state(d: Obj) -> RolloutState:
    """Where a deployment's rollout stands, decided as ``kubectl rollout status`` decides it
    (kubectl/pkg/polymorphichelpers/rollout_status.go, DeploymentStatusViewer)."""
    meta, spec, status = d["metadata"], d.get("spec") or {}, d.get("status") or {}
    name = meta["name"]
    if int(meta.get("generation") or 0) > int(status.get("observedGeneration") or 0):
        return RolloutState("waiting for the deployment spec update to be observed", False, False)
    for c in status.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(f'deployment "{name}" exceeded its progress deadline'
                                + (f": {c['message']}" if c.get("message") else ""), True, True)
    wanted = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    replicas = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < wanted:
        return RolloutState(f"{updated} of {wanted} updated replicas", False, False)
    if replicas > updated:
        return RolloutState(f"{replicas - updated} old replicas pending termination", False, False)
    if available < updated:
        return RolloutState(f"{available} of {updated} updated replicas available", False, False)
    return RolloutState(f"successfully rolled out ({available} of {wanted} available)", True, False)


POLL_SECONDS = 1.0
MIN_GAP_SECONDS = 10.0  # between two progress replies in a thread (the first and the last are always posted)
MAX_FOLLOW_SECONDS = 30 * 60


async def follow_rollout(dep: Deployment, ctx: Context, *, poll: float = POLL_SECONDS,
                         min_gap: float = MIN_GAP_SECONDS) -> AsyncIterator[Progress]:
    """Watch a deployment's rollout (by polling, as each step is cheap) until it is complete, has
    exceeded its progress deadline, or has gone on past the deadline plus a margin."""
    loop = asyncio.get_running_loop()
    started = last_post = loop.time()
    last_text = ""
    errors = 0
    while True:
        try:
            d = await ctx.kube.read_deployment(dep.environment, dep.namespace, dep.name)
            errors = 0
        except OpsbotError as exc:
            errors += 1
            if errors >= 5:
                yield Progress(text=f":warning: Stopped following the rollout of {dep.name}: {exc}. Check it with "
                                    f"`/ops status`.", done=True, failed=True)
                return
            await asyncio.sleep(poll)
            continue
        state = rollout_state(d)
        deadline = int((d.get("spec") or {}).get("progressDeadlineSeconds") or 600)
        now = loop.time()
        if state.done:
            icon = ":rotating_light:" if state.failed else ":white_check_mark:"
            yield Progress(text=f"{icon} Rollout of {dep.name}: {state.text}.", done=True, failed=state.failed)
            return
        if now - started > min(MAX_FOLLOW_SECONDS, deadline + 60):
            yield Progress(text=f":rotating_light: Rollout of {dep.name} still not complete after {int(now - started)} s "
                                f"({state.text}); no longer following it.", done=True, failed=True)
            return
        if state.text != last_text and (not last_text or now - last_post >= min_gap):
            yield Progress(text=f":hourglass_flowing_sand: Rollout of {dep.name}: {state.text}…")
            last_text, last_post = state.text, now
        await asyncio.sleep(poll)
