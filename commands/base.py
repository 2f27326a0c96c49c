"""What every command is, and the shared argument grammar."""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from bot.config import Config, Deployment
from bot.domain import Outcome, Plan, Progress
from bot.errors import NotFound, UsageError
from bot.messages import code
from bot.ports import Context
from bot.untrusted import non_ascii_hint

Params = dict[str, Any]
T = TypeVar("T")
NO_SAFE_INVERSE = "has no safe inverse"


@dataclass(frozen=True, kw_only=True)
class Inverse:
    """How to undo a request that succeeded (``Command.inverse``): the ``/ops`` text of a new request
    that puts back what it changed (parsed again like anything typed, so every check of the grammar
    applies), or, with ``text`` None, why there is none."""

    text: str | None = None
    why: str = ""  # with text: what the undo does ("worker back to 3 replicas"); without: why there is none

    @property
    def possible(self) -> bool:
        return self.text is not None


def typed(*words: Any) -> str:
    """``/ops`` text from words, quoted where needed so that parsing it gives these words back."""
    return shlex.join(str(w) for w in words)


class Command(ABC):
    name: ClassVar[str]  # the policy name, e.g. "replay-webhook"
    words: ClassVar[tuple[str, ...]]  # what is typed, e.g. ("replay", "webhook")
    usage: ClassVar[str]  # "/ops scale <deployment> <replicas>"
    summary: ClassVar[str]
    mutating: ClassVar[bool] = True
    backend: ClassVar[str] = "the Kubernetes API"  # what it reads, for "… is slow or down" answers
    flags: ClassVar[dict[str, type]] = {}  # command-specific flags, e.g. {"--to-revision": int}

    @abstractmethod
    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        """Typed parameters from the positional arguments; raise UsageError/NotFound/Refused."""

    @abstractmethod
    async def plan(self, params: Params, ctx: Context) -> Plan:
        """Read-only: look at the target and say exactly what will change."""

    def locate(self, params: Params, config: Config) -> Plan | None:
        """A plan skeleton from config alone (no I/O): target and environment, no before/after.
        `opsbot policy explain --no-plan` decides on it."""
        dep = config.deployments.get(str(params.get("deployment", "")))
        if dep is None:
            return None
        return self.deployment_plan(dep, params, summary=f"{' '.join(self.words)} {params['deployment']} (not read)")

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        raise NotImplementedError(f"{self.name} is read-only")

    def follow(self, plan: Plan, outcome: Outcome, ctx: Context) -> AsyncIterator[Progress] | None:
        """After a successful execute: what the change does next (a rollout, a job), observed
        until it is over; the worker posts each step in the request's thread. None: nothing to follow."""
        return None

    # ------------------------------------------------------------------ undo (bot/undo.py)

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        """The request that undoes a succeeded one, computed from its stored plan (``Plan.to_json``)
        and result, without I/O. By default there is none: only commands that know how to put back
        exactly what they changed say otherwise (a replayed webhook, a job retried, a session
        terminated cannot be taken back)."""
        return Inverse(why=f"`{' '.join(self.words)}` {NO_SAFE_INVERSE}")

    def undo_keys(self, original_plan: dict[str, Any]) -> tuple[str, ...]:
        """Which of the original's ``after`` fields must still hold for its undo not to be stale."""
        return tuple(original_plan.get("after") or {})

    def moved_on(self, original_plan: dict[str, Any], fresh: Plan, request_id: str) -> str | None:
        """None when the target is still as ``request_id`` left it (the inverse's fresh plan reads
        ``before`` = the original's ``after``); else what changed, in words."""
        then, now = original_plan.get("after") or {}, fresh.before
        changed = [k for k in self.undo_keys(original_plan) if k in then and now.get(k) != then[k]]
        if not changed:
            return None
        label = original_plan.get("target_name") or original_plan.get("target_label") or "the target"
        return (f"{label} has " + ", ".join(f"{k} {now.get(k)!r}" for k in changed) + " now, not the "
                + ", ".join(f"{k} {then[k]!r}" for k in changed) + f" that `{request_id}` set")

    def undo_offer(self, plan: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """What a succeeded request's card and thread say about its undo (kept in its result)."""
        inverse = self.inverse(plan, result)
        return {"offered": inverse.possible, "why": inverse.why}

    def deployment_plan(self, dep: Deployment, params: Params, **fields: Any) -> Plan:
        """A Plan on a configured deployment: target key, label and environment filled in."""
        return Plan(command=self.name, target=deployment_target(dep), target_label=f"{params['deployment']} ({dep.namespace}/{dep.name})",
                    environment=dep.environment, params=params, mutating=self.mutating, target_name=params["deployment"],
                    target_kind="deployments", **fields)

    def usage_error(self, message: str) -> UsageError:
        return UsageError(message, usage=self.usage)

    def expect_args(self, args: list[str], names: list[str]) -> None:
        if len(args) < len(names):
            missing = names[len(args)]
            article = "an" if missing[0] in "aeiou" else "a"
            raise self.usage_error(f"`{' '.join(self.words)}` needs {article} {missing}.")
        if len(args) > len(names):
            extra = args[len(names):]
            raise self.usage_error(f"unexpected argument{'s' if len(extra) > 1 else ''} `{' '.join(extra)}`.")


class OnDeployment(Command):
    """A command whose only argument is a deployment alias (status, history, pods, events, restart)."""

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["deployment"])
        deployment_alias(config, args[0])
        return {"deployment": args[0]}


def named(section: Mapping[str, T], name: str, what: str, plural: str = "") -> T:
    """The entry ``name`` of a config section (deployments, cronjobs, queues, databases…), or a
    NotFound that lists the known names and points at look-alike letters. The typed name is shown
    bounded and inert (it cannot become a mention or a link in the reply)."""
    entry = section.get(name)
    if entry is None:
        known = ", ".join(sorted(section)) or "none configured"
        raise NotFound(f"unknown {what} {code(name[:100])}{non_ascii_hint(name[:100])}. Known {plural or what + 's'}: {known}.")
    return entry


def deployment_alias(config: Config, alias: str) -> Deployment:
    return named(config.deployments, alias, "deployment")


def deployment_target(dep: Deployment) -> str:
    return f"deployment/{dep.environment}/{dep.namespace}/{dep.name}"


def images_of(template: dict[str, Any]) -> list[str]:
    return [f"{c.get('name')}={c.get('image')}" for c in (template.get("spec") or {}).get("containers") or []]


def match_labels_selector(selector: dict[str, Any]) -> str:
    """A Deployment's label selector as the ``labelSelector`` query string."""
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op = expr["operator"]
        if op in ("In", "NotIn"):
            terms.append(f"{expr['key']} {op.lower()} ({','.join(expr.get('values') or [])})")
        elif op == "Exists":
            terms.append(expr["key"])
        else:
            terms.append("!" + expr["key"])
    return ",".join(terms)


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """``2026-11-30T10:00:00Z`` → ``3h``, as kubectl prints ages."""
    if not timestamp:
        return "?"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "m" and seconds >= size):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
