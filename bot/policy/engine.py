"""The policy decision: a pure function of (what, who, policy). No I/O.

Deny by default. A rule matches a request when it lists the command and (if it names
environments) the target's environment. The actor may run the command when at least one matching
rule's ``allow`` names one of the actor's roles. If any matching rule has an ``approval``, the
strictest one applies (the highest count): rules add requirements, never remove them, so a rule
added for a risky case cannot be undone by a broader rule above it.

``help``, ``opsbot policy explain`` and the real request path all call ``decide``; nothing else
decides.
"""

from __future__ import annotations

from bot.config import Config, Rule
from bot.domain import Actor, Decision, DecisionKind, Plan


def _matches(rule: Rule, command: str, environment: str | None) -> bool:
    if command not in rule.commands:
        return False
    return not rule.environments or environment is None or environment in rule.environments


def decide(subject: Plan | str, actor: Actor, config: Config) -> Decision:
    """``subject`` is a Plan (the real path) or a bare command name (help: no target yet)."""
    command = subject if isinstance(subject, str) else subject.command
    environment = None if isinstance(subject, str) else subject.environment
    roles = config.roles_of(actor.user_id)
    matching = [(i, r) for i, r in enumerate(config.rules) if _matches(r, command, environment)]
    allowing = [(i, r) for i, r in matching if roles.intersection(r.allow)]
    where = f" in {environment}" if environment else ""
    if not allowing:
        your = ", ".join(sorted(roles)) or "none"
        if not matching:
            return Decision(kind=DecisionKind.DENY, reason=f"no policy rule covers `{command}`{where}; it is denied by default.")
        return Decision(
            kind=DecisionKind.DENY,
            rule=", ".join(config.rule_name(i) for i, _ in matching),
            reason=f"you may not run `{command}`{where} (your roles: {your}; allowed: "
                   f"{', '.join(sorted({a for _, r in matching for a in r.allow})) or 'nobody'}).",
        )
    allow_index = allowing[0][0]
    read_only = not isinstance(subject, str) and not subject.mutating
    approvals = [(i, r) for i, r in matching if r.approval is not None]
    if not approvals or read_only:
        return Decision(kind=DecisionKind.ALLOW, rule=config.rule_name(allow_index),
                        reason=f"allowed by {config.rule_name(allow_index)} without approval.")
    index, strictest = max(approvals, key=lambda ir: (ir[1].approval.count if ir[1].approval else 0, -ir[0]))
    assert strictest.approval is not None
    return Decision(
        kind=DecisionKind.NEEDS_APPROVAL,
        rule=config.rule_name(index),
        reason=f"allowed by {config.rule_name(allow_index)}; {strictest.approval.count} approval(s) from "
               f"{', '.join(strictest.approval.from_)} required by {config.rule_name(index)}.",
        approver_roles=tuple(strictest.approval.from_),
        approvals_required=strictest.approval.count,
        expires_in_seconds=strictest.approval.expires,
    )


def may_approve(approver: Actor, *, requester: Actor, approver_roles: tuple[str, ...], config: Config) -> str | None:
    """None if ``approver`` may approve; otherwise the reason they may not. The requester's own
    click never counts, whatever roles they hold."""
    if approver.user_id == requester.user_id:
        return "you cannot approve your own request; another approver must."
    if not config.roles_of(approver.user_id).intersection(approver_roles):
        return f"you cannot approve this: approvals must come from {', '.join(approver_roles)}."
    return None
