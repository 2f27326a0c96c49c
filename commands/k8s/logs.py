"""`/ops logs <deployment> [--since 10m] [--tail 200] [--previous] [--grep TEXT] [--container NAME]`
— the recent log lines of a deployment's pods, as `kubectl logs` reads them, posted in a thread
under the answer. Read-only, but policy-controlled like any command: logs can hold personal data.

What is shown is bounded: at most ``MAX_PODS`` pods, ``--tail`` lines each (≤ ``MAX_TAIL``), each
pod's read capped at ``LIMIT_BYTES`` by the API server itself, and the whole at ``MAX_CHARS``. Every
line is scrubbed of secret-shaped text (bot/redaction.py) before it leaves opsbot. The audit row
records what was asked and how many lines were shown, never the lines.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from bot.config import Config, parse_duration
from bot.domain import Plan
from bot.errors import UserError
from bot.messages import plural
from bot.ports import Context, Obj
from bot.redaction import scrub_text
from commands.base import Command, Params, deployment_alias
from commands.k8s.workload import pods_of, read_workload

MAX_PODS = 10
MAX_TAIL = 1000
DEFAULT_TAIL = 200
MAX_SINCE = 7 * 86400
MAX_GREP = 200
GREP_READ = 2000  # lines read per pod when filtering, so that --grep finds more than the last few
LIMIT_BYTES = 512 * 1024
MAX_CHARS = 30_000
LOG_BUDGET = 1.2  # seconds for all the pods' log reads (the answer is due within 2 s, see bot/pipeline.py)
_CONTAINER = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"


def _container_of(pod: Obj, wanted: str | None) -> tuple[str, str]:
    """The container to read and a note on the choice (kubectl's rule: the annotation, else the first)."""
    names = [str(c["name"]) for c in (pod.get("spec") or {}).get("containers") or []]
    if wanted:
        if wanted not in names:
            raise UserError(f"pod {pod['metadata']['name']} has no container `{wanted}`; it has {', '.join(names) or 'none'}.")
        return wanted, ""
    default = (pod["metadata"].get("annotations") or {}).get(DEFAULT_CONTAINER)
    chosen = default if default in names else (names[0] if names else "")
    note = f" (container {chosen}; others: {', '.join(n for n in names if n != chosen)} — pick one with `--container`)" \
        if len(names) > 1 else ""
    return chosen, note


class Logs(Command):
    name = "logs"
    words = ("logs",)
    usage = "/ops logs <deployment> [--since 10m] [--tail 200] [--previous] [--grep TEXT] [--container NAME]"
    summary = "Recent log lines of a deployment's pods (secrets scrubbed), in a thread."
    mutating = False
    flags = {"--since": str, "--tail": int, "--previous": bool, "--grep": str, "--container": str}

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["deployment"])
        deployment_alias(config, args[0])
        since = None
        if "--since" in flags:
            try:
                since = parse_duration(str(flags["--since"]))
            except ValueError:
                raise self.usage_error(f"`--since` takes a duration such as 10m, 2h or 1d, got `{flags['--since']}`.") from None
            if not 1 <= since <= MAX_SINCE:
                raise self.usage_error(f"`--since` goes back at most 7d, got `{flags['--since']}`.")
        tail = int(flags.get("--tail", DEFAULT_TAIL))
        if not 1 <= tail <= MAX_TAIL:
            raise self.usage_error(f"`--tail` takes 1 to {MAX_TAIL} lines, got {tail}. Try `--tail {min(max(tail, 1), MAX_TAIL)}`.")
        grep = str(flags.get("--grep", ""))
        if "--grep" in flags and not grep.strip():
            raise self.usage_error('`--grep` needs the text to look for, e.g. `--grep "timeout"`.')
        if len(grep) > MAX_GREP:
            raise self.usage_error(f"`--grep` takes at most {MAX_GREP} characters.")
        container = flags.get("--container")
        if container is not None and not _CONTAINER.match(str(container)):
            raise self.usage_error(f"`--container` takes a container name (lowercase letters, digits, '-'), got `{str(container)[:70]}`.")
        return {"deployment": args[0], "since_seconds": since, "tail": tail, "previous": bool(flags.get("--previous")),
                "grep": grep, "container": container}

    async def plan(self, params: Params, ctx: Context) -> Plan:
        dep = deployment_alias(ctx.config, params["deployment"])
        pods = await pods_of(dep, await read_workload(dep, ctx), ctx)
        tail, grep = int(params["tail"]), str(params.get("grep") or "")
        chosen = [(pod, *_container_of(pod, params.get("container"))) for pod in pods[:MAX_PODS]]
        reads = [asyncio.ensure_future(ctx.kube.read_pod_log(
            dep.environment, dep.namespace, str(pod["metadata"]["name"]), container=container,
            since_seconds=params.get("since_seconds"), tail_lines=min(GREP_READ, tail * 10) if grep else tail,
            previous=bool(params.get("previous")), limit_bytes=LIMIT_BYTES)) for pod, container, _ in chosen]
        if reads:  # the pods are read side by side; one that does not answer in time is named, not waited for
            await asyncio.wait(reads, timeout=LOG_BUDGET)
        sections, shown, notes = [], 0, []
        for (pod, _container, note), read in zip(chosen, reads, strict=True):
            name = str(pod["metadata"]["name"])
            if not read.done():
                read.cancel()
                notes.append(f"{name}: the Kubernetes API did not send its log within {LOG_BUDGET:g} s")
                continue
            exc = read.exception()
            if isinstance(exc, UserError):  # e.g. no previous container: say so for this pod, show the others
                notes.append(f"{name}: {exc}")
                continue
            if exc is not None:
                raise exc
            lines = read.result().splitlines()
            if grep:
                lines = [line for line in lines if grep.lower() in line.lower()]
            lines = lines[-tail:]
            shown += len(lines)
            sections.append(f"── {name}{note} — {plural(len(lines), 'line')}\n" + "\n".join(scrub_text(line) for line in lines))
        body = "\n".join(sections)
        if len(body) > MAX_CHARS:
            body = "…(earlier lines cut)\n" + body[-MAX_CHARS:]
        what = ("previous container's " if params.get("previous") else "") + "log line"
        window = []
        if params.get("since_seconds"):
            window.append(f"last {params['since_seconds']} s")
        window.append(f"at most {tail} per pod")
        if grep:
            window.append(f"containing “{grep}”")
        details = [plural(len(pods), "pod") + (f", the first {MAX_PODS} read" if len(pods) > MAX_PODS else "") + f"; {', '.join(window)}",
                   *notes]
        if not pods:
            details.append("no pods to read (scaled to 0?)")
        return self.deployment_plan(dep, params, summary=f"{dep.name}: {plural(shown, what)}", details=tuple(details),
                                    facts={"lines": shown, "pods": len(pods)}, attachment=body if shown else "")
