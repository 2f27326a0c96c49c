"""`/ops pods <deployment>` — each pod as `kubectl get pods` shows it, plus what people then go
looking for in `kubectl describe`: the node and why the last container run ended (OOMKilled,
Error with its exit code). Read-only."""

from __future__ import annotations

from bot.domain import Plan
from bot.messages import plural
from bot.ports import Context, Obj
from commands.base import OnDeployment, Params, age, deployment_alias
from commands.k8s.workload import pods_of, read_workload

MAX_SHOWN = 30


def pod_line(pod: Obj) -> str:
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    total = len((pod.get("spec") or {}).get("containers") or []) or len(statuses)
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
    phase = status.get("phase") or "Unknown"
    for c in statuses:  # a waiting reason (CrashLoopBackOff, ImagePullBackOff) says more than the phase
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            phase = str(waiting["reason"])
            break
    if pod["metadata"].get("deletionTimestamp"):
        phase = "Terminating"
    last = []
    for c in statuses:
        t = (c.get("lastState") or {}).get("terminated")
        if t:
            last.append(f"{c.get('name')}: {t.get('reason') or 'terminated'} (exit {t.get('exitCode', '?')}, "
                        f"{age(t.get('finishedAt'))} ago)")
    line = (f"`{pod['metadata']['name']}` {phase}, ready {ready}/{total}, restarts {restarts}, "
            f"age {age(status.get('startTime') or pod['metadata'].get('creationTimestamp'))}, "
            f"node {(pod.get('spec') or {}).get('nodeName') or '—'}")
    return line + (f" — last ended: {'; '.join(last)}" if last else "")


class Pods(OnDeployment):
    name = "pods"
    words = ("pods",)
    usage = "/ops pods <deployment>"
    summary = "A deployment's pods: phase, ready, restarts, age, node and why the last run ended."
    mutating = False

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        pods = await pods_of(dep, await read_workload(dep, ctx), ctx)
        lines = [pod_line(p) for p in pods[:MAX_SHOWN]]
        if len(pods) > MAX_SHOWN:
            lines.append(f"…and {len(pods) - MAX_SHOWN} more")
        if not pods:
            lines.append("no pods (scaled to 0, or none created yet)")
        running = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running")
        restarts = sum(int(c.get("restartCount") or 0) for p in pods for c in (p.get("status") or {}).get("containerStatuses") or [])
        return self.deployment_plan(dep, params,
                                    summary=f"{dep.name}: {plural(len(pods), 'pod')}, {running} running, {plural(restarts, 'restart')}",
                                    details=tuple(lines), facts={"pods": len(pods)})
