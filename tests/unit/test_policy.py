"""``decide`` is a pure function: a table of who asks for what, and what the policy answers."""

from __future__ import annotations

import pytest

from bot.config import parse_config
from bot.domain import Actor, DecisionKind, Plan, UserId
from bot.policy.engine import decide, may_approve

POLICY = parse_config("""
roles:
  engineer: {users: [U_ENG, U_BOTH]}
  approver: {users: [U_APP, U_BOTH, U_APP2]}
  lead:     {users: [U_LEAD]}
  auditor:  {users: [U_AUD]}
environments: {production: {}, staging: {}}
rules:
  - {name: read-only, commands: [help, status], allow: [engineer, approver, auditor]}
  - {name: prod-changes, commands: [scale, rollback], allow: [engineer], environments: [production],
     approval: {from: [approver], count: 1}}
  - {name: staging-changes, commands: [scale, rollback], allow: [engineer], environments: [staging]}
  - {name: rollback-needs-two, commands: [rollback], environments: [production], approval: {from: [approver, lead], count: 2}}
  - {name: providers, commands: [disable-provider], allow: [lead]}
""", env={})


def plan(command: str, environment: str, mutating: bool = True) -> Plan:
    return Plan(command=command, target=f"x/{command}", target_label="x", environment=environment, params={},
                summary="", mutating=mutating)


@pytest.mark.parametrize(("user", "subject", "kind", "count", "rule"), [
    ("U_ENG", plan("scale", "production"), DecisionKind.NEEDS_APPROVAL, 1, "prod-changes"),
    ("U_ENG", plan("scale", "staging"), DecisionKind.ALLOW, 0, "staging-changes"),
    ("U_ENG", plan("rollback", "production"), DecisionKind.NEEDS_APPROVAL, 2, "rollback-needs-two"),
    ("U_ENG", plan("rollback", "staging"), DecisionKind.ALLOW, 0, "staging-changes"),
    ("U_APP", plan("scale", "production"), DecisionKind.DENY, 0, "prod-changes"),
    ("U_AUD", plan("status", "production", mutating=False), DecisionKind.ALLOW, 0, "read-only"),
    ("U_AUD", plan("scale", "staging"), DecisionKind.DENY, 0, "staging-changes"),
    ("U_NOBODY", plan("status", "production", mutating=False), DecisionKind.DENY, 0, "read-only"),
    ("U_LEAD", plan("disable-provider", "production"), DecisionKind.ALLOW, 0, "providers"),
    ("U_ENG", plan("disable-provider", "production"), DecisionKind.DENY, 0, "providers"),
    ("U_ENG", plan("replay-webhook", "production"), DecisionKind.DENY, 0, None),
    ("U_ENG", "scale", DecisionKind.NEEDS_APPROVAL, 1, "prod-changes"),
    ("U_AUD", "scale", DecisionKind.DENY, 0, "prod-changes, staging-changes"),
])
def test_decisions(user: str, subject: Plan | str, kind: DecisionKind, count: int, rule: str | None) -> None:
    d = decide(subject, Actor(UserId(user)), POLICY)
    assert (d.kind, d.approvals_required, d.rule) == (kind, count, rule), d.reason


def test_deny_says_why() -> None:
    d = decide(plan("scale", "production"), Actor(UserId("U_AUD")), POLICY)
    assert d.reason == "you may not run `scale` in production (your roles: auditor; allowed: engineer)."
    d = decide(plan("replay-webhook", "production"), Actor(UserId("U_ENG")), POLICY)
    assert "no policy rule covers `replay-webhook` in production; it is denied by default." == d.reason


@pytest.mark.parametrize(("approver", "requester", "ok"), [
    ("U_APP", "U_ENG", True),
    ("U_BOTH", "U_ENG", True),
    ("U_BOTH", "U_BOTH", False),  # an approver who is also the requester cannot approve their own request
    ("U_ENG", "U_BOTH", False),   # not an approver
    ("U_LEAD", "U_ENG", False),
])
def test_who_may_approve(approver: str, requester: str, ok: bool) -> None:
    why = may_approve(Actor(UserId(approver)), requester=Actor(UserId(requester)), approver_roles=("approver",), config=POLICY)
    assert (why is None) is ok, why
