"""The policy decision: a pure function of (what, who, where, when, policy). No I/O.

``decide(plan, actor, policy, channel_id=…, now=…, break_glass=…)`` answers ALLOW, NEEDS_APPROVAL
(from which roles, how many, at least one from each of which roles), BREAK_GLASS or DENY, with the
rule that made it and a trace of every rule weighed (``opsbot policy explain`` prints it).

The language, in the order it is applied:

1. **Channel allowlist** (``slack.allowed_channels``): commands other than ``help`` are refused
   outside the listed channels.
2. **Frozen environments** (``environments.<env>.frozen: "<reason>"``): mutating commands in that
   environment are refused with the reason; read-only ones still work. Break-glass does not thaw a
   freeze: a freeze is leadership's decision, not an on-call engineer's.
3. **Matching rules**: a rule matches when it lists the command and, where it says so, the target's
   environment, the target (alias, ``provider:<name>``, ``webhooks``, a kind or a target group), the
   channel, and its ``when:`` conditions hold on the plan (replicas above N, scale factor above X,
   rollback more than N revisions back, inside/outside a UTC time window).
4. **Deny by default**: the actor may run the command only if a matching rule's ``allow`` names one
   of the actor's roles (from Slack user ids and Slack user groups).
5. **Approvals add up**: among matching rules with an ``approval``, the strictest applies (highest
   count; ``each_of`` and approver roles are merged over rules of that count; the shortest expiry
   wins). Rules add requirements, never remove them, so a rule written for a risky case cannot be
   undone by a broader one.
6. **Break-glass**: with ``--break-glass "<reason>"``, an actor runs without waiting only if *every*
   matching rule that asks for approval lists one of their roles in its ``break_glass`` (such a
   role alone lets them run it, with the flag); the review needs the approvals the strictest of
   those rules asks for. If any such rule does not list one of their roles, or for anyone else
   asking, break-glass is refused, naming the rule (not silently sent through the normal path; they
   can still request it without the flag). Like approvals, break-glass never undoes a stricter rule.

The requester never counts as an approver (``may_approve``), whatever roles they hold; ``quorum_met``
counts distinct people, and ``each_of`` needs a distinct person per role.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from bot.config import READ_ONLY_COMMANDS, Conditions, Config, Rule
from bot.domain import Actor, Decision, DecisionKind, Plan
from bot.messages import plural

READ_ONLY_ALWAYS = ("help",)


def _targets(rule: Rule, plan: Plan, config: Config) -> bool:
    if not rule.targets:
        return True
    names = {plan.target_name, plan.target_kind}
    for t in rule.targets:
        if t in names or names.intersection(config.target_groups.get(t, ())):
            return True
    return False


def _conditions(when: Conditions, plan: Plan, now: datetime) -> tuple[bool, str]:
    """Whether all conditions hold, and a short description for the trace."""
    facts = plan.facts
    held: list[str] = []
    if when.replicas_above is not None:
        after = facts.get("replicas_after")
        if after is None or after <= when.replicas_above:
            return False, f"replicas not above {when.replicas_above}"
        held.append(f"replicas {after} > {when.replicas_above}")
    if when.scale_factor_above is not None:
        before, after = facts.get("replicas_before"), facts.get("replicas_after")
        if before is None or after is None:
            return False, "not a scale"
        low, high = sorted((before, after))
        factor = float("inf") if low == 0 else high / low
        if factor <= when.scale_factor_above:
            return False, f"scale factor {factor:g} not above {when.scale_factor_above:g}"
        held.append(f"scale factor {factor:g} > {when.scale_factor_above:g}")
    if when.revisions_back_above is not None:
        back = facts.get("revisions_back")
        if back is None or back <= when.revisions_back_above:
            return False, f"not more than {plural(when.revisions_back_above, 'revision')} back"
        held.append(f"{back} revisions back > {when.revisions_back_above}")
    if when.inside_window is not None:
        if not when.inside_window.contains(now):
            return False, f"outside {when.inside_window.describe()}"
        held.append(f"inside {when.inside_window.describe()}")
    if when.outside_window is not None:
        if when.outside_window.contains(now):
            return False, f"inside {when.outside_window.describe()}"
        held.append(f"outside {when.outside_window.describe()}")
    return True, ", ".join(held)


def _matches(rule: Rule, command: str, plan: Plan | None, channel_id: str | None, now: datetime,
             config: Config) -> tuple[bool, str]:
    if command not in rule.commands:
        return False, "other commands"
    if rule.channels and channel_id is not None and channel_id not in rule.channels:
        return False, "other channels"
    if plan is None:  # help / --no-plan: no target yet; conditions cannot be known
        return True, "command matches (target not known)"
    if rule.environments and plan.environment not in rule.environments:
        return False, f"other environments ({', '.join(rule.environments)})"
    if not _targets(rule, plan, config):
        return False, f"other targets ({', '.join(rule.targets)})"
    if rule.when is not None:
        ok, why = _conditions(rule.when, plan, now)
        return ok, ("matches: " + why) if ok else ("conditions do not hold: " + why)
    return True, "matches"


def decide(subject: Plan | str, actor: Actor, policy: Config, *, channel_id: str | None = None,
           now: datetime | None = None, break_glass: bool = False) -> Decision:
    """``subject`` is a Plan (the real path) or a bare command name (help: no target yet).
    ``now`` defaults to the current time; pass it for a reproducible answer."""
    now = now or datetime.now(UTC)
    plan = None if isinstance(subject, str) else subject
    command = subject if isinstance(subject, str) else subject.command
    mutating = plan.mutating if plan is not None else command not in READ_ONLY_COMMANDS
    environment = plan.environment if plan else None
    where = f" in {environment}" if environment else ""
    roles = policy.roles_of(actor.user_id, actor.groups)
    trace: list[str] = [f"actor {actor.user_id}: roles {', '.join(sorted(roles)) or 'none'}"]

    def deny(reason: str, rule: str | None = None) -> Decision:
        return Decision(kind=DecisionKind.DENY, reason=reason, rule=rule, trace=(*trace, f"→ deny: {reason}"))

    if command in READ_ONLY_ALWAYS:
        return Decision(kind=DecisionKind.ALLOW, reason="help is open to everyone", trace=tuple(trace))
    allowed_channels = policy.slack.allowed_channels
    if allowed_channels and channel_id is not None and channel_id not in allowed_channels:
        return deny("opsbot takes commands only in " + ", ".join(f"<#{c}>" for c in allowed_channels)
                    + "; run it there.", "slack.allowed_channels")
    if environment is not None and mutating:
        frozen = (policy.environments.get(environment) or None)
        if frozen is not None and frozen.frozen:
            return deny(f"{environment} is frozen: {frozen.frozen}. Mutating commands are refused there; read-only ones work.",
                        f"environments.{environment}.frozen")

    matching: list[tuple[int, Rule]] = []
    for i, rule in enumerate(policy.rules):
        ok, why = _matches(rule, command, plan, channel_id, now, policy)
        if command in rule.commands:
            trace.append(f"{policy.rule_name(i)}: {why}")
        if ok:
            matching.append((i, rule))
    # A break-glass role may run what its rule covers (only with --break-glass).
    allowing = [(i, r) for i, r in matching if roles.intersection(r.allow) or (break_glass and roles.intersection(r.break_glass))]
    if not allowing:
        if not matching:
            return deny(f"no policy rule lets anyone run `{command}`{where} here; it is denied by default.")
        allowed_roles = ", ".join(sorted({a for _, r in matching for a in r.allow})) or "nobody"
        return deny(f"you may not run `{command}`{where} (your roles: {', '.join(sorted(roles)) or 'none'}; "
                    f"allowed: {allowed_roles}).", ", ".join(policy.rule_name(i) for i, _ in matching))
    allow_name = policy.rule_name(allowing[0][0])
    trace.append(f"allowed by {allow_name}")
    max_open = min((r.max_open_per_user for _, r in matching if r.max_open_per_user), default=None)
    # Conditional rules are unknown without a plan (help): only unconditional ones set the approval.
    approvals = [(i, r) for i, r in matching if r.approval is not None and (plan is not None or r.when is None)]
    if not approvals or not mutating:
        if break_glass:
            trace.append("--break-glass ignored: no approval is needed")
        return Decision(kind=DecisionKind.ALLOW, rule=allow_name, reason=f"allowed by {allow_name} without approval.",
                        max_open_per_user=max_open, trace=(*trace, "→ allow"))
    top = max(r.approval.count for _, r in approvals if r.approval)
    strictest = [(i, r) for i, r in approvals if r.approval and r.approval.count == top]
    approver_roles = tuple(dict.fromkeys(role for _, r in strictest if r.approval for role in r.approval.from_))
    each_of = tuple(dict.fromkeys(role for _, r in strictest if r.approval for role in r.approval.each_of))
    expires = min(r.approval.expires for _, r in approvals if r.approval)
    rule_names = ", ".join(policy.rule_name(i) for i, _ in strictest)
    # Reminders: the soonest any strictest rule asks for (0 in all of them: none); escalation: the
    # soonest, to every role those rules escalate to.
    remind = min((r.approval.remind_after for _, r in strictest if r.approval and r.approval.remind_after), default=None)
    escalate = min((r.approval.escalate_after for _, r in strictest if r.approval and r.approval.escalate_after), default=None)
    escalate_to = tuple(dict.fromkeys(role for _, r in strictest if r.approval for role in r.approval.escalate_to))
    need = (f"{plural(top, 'approval')} from {', '.join(approver_roles)}"
            + (f", at least one from each of {', '.join(each_of)}" if each_of else ""))
    if break_glass:
        # Every rule that asks for approval must let one of the actor's roles skip it: a broad
        # rule's break_glass does not undo a stricter rule that has none (rules only add requirements).
        blocking = [i for i, r in approvals if not roles.intersection(r.break_glass)]
        if blocking:
            names = ", ".join(policy.rule_name(i) for i in blocking)
            return deny(f"you may not break glass for `{command}`{where}: {names} "
                        f"{'does' if len(blocking) == 1 else 'do'} not allow break-glass for your roles "
                        f"({', '.join(sorted(roles)) or 'none'}); ask for approval instead (drop --break-glass).", names)
        name = ", ".join(policy.rule_name(i) for i, _ in approvals)
        trace.append(f"break-glass allowed by {name} (every rule asking for approval)")
        return Decision(kind=DecisionKind.BREAK_GLASS, rule=name,
                        reason=f"break-glass allowed by {name}; it runs now and {need} must review it afterwards.",
                        approver_roles=approver_roles, approvals_required=top, approvals_each=each_of,
                        expires_in_seconds=expires, max_open_per_user=max_open, remind_after=remind,
                        trace=(*trace, "→ break glass"))
    trace.append(f"approval: {need} (from {rule_names})")
    return Decision(
        kind=DecisionKind.NEEDS_APPROVAL,
        rule=rule_names,
        reason=f"allowed by {allow_name}; {need} required by {rule_names}.",
        approver_roles=approver_roles,
        approvals_required=top,
        approvals_each=each_of,
        expires_in_seconds=expires,
        max_open_per_user=max_open,
        remind_after=remind,
        escalate_after=escalate,
        escalate_to=escalate_to if escalate else (),
        trace=(*trace, "→ needs approval"),
    )


def may_approve(approver: Actor, *, requester: Actor, approver_roles: Sequence[str], config: Config) -> str | None:
    """None if ``approver`` may approve; otherwise the reason they may not. The requester's own
    click never counts, whatever roles they hold."""
    if approver.user_id == requester.user_id:
        return "you cannot approve your own request; another approver must."
    if not config.roles_of(approver.user_id, approver.groups).intersection(approver_roles):
        return f"you cannot approve this: approvals must come from {', '.join(approver_roles)}."
    return None


def quorum_met(approver_roles: Sequence[Sequence[str]], *, count: int, each_of: Sequence[str]) -> bool:
    """``approver_roles`` holds, per distinct approving person, the roles they had when they
    approved. Enough people, and for every role in ``each_of`` a different person holding it (a
    person with two roles fills one slot, not two)."""
    if len(approver_roles) < count:
        return False
    # Bipartite matching of each_of roles to distinct approvers (augmenting paths; tiny sizes).
    assigned: dict[int, str] = {}

    def place(role: str, seen: set[int]) -> bool:
        for person, roles in enumerate(approver_roles):
            if role in roles and person not in seen:
                seen.add(person)
                if person not in assigned or place(assigned[person], seen):
                    assigned[person] = role
                    return True
        return False

    return all(place(role, set()) for role in each_of)
