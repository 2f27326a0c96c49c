"""``decide`` is a pure function: a table of who asks for what, where and when, and what the policy
answers. Each row is one case a security reviewer can read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bot.config import parse_config
from bot.domain import Actor, DecisionKind, Plan, UserId
from bot.policy.engine import decide, may_approve, quorum_met

POLICY = parse_config("""
slack: {allowed_channels: [C_INC, C_OPS]}
roles:
  engineer: {users: [U_ENG, U_BOTH], usergroups: [S_ONCALL]}
  approver: {users: [U_APP, U_BOTH, U_APP2], usergroups: [S_LEADS]}
  lead:     {users: [U_LEAD]}
  dba:      {users: [U_DBA]}
  auditor:  {users: [U_AUD]}
  incident-commander: {users: [U_IC]}
environments:
  production: {}
  staging: {}
  production-eu: {frozen: "EU freeze until the audit closes"}
deployments:
  worker: {environment: production, namespace: nova, name: nova-worker}
  api: {environment: production, namespace: nova, name: nova-api}
  eu-api: {environment: production-eu, namespace: nova, name: nova-api}
  stg-api: {environment: staging, namespace: nova, name: nova-api}
target_groups:
  payments: ["provider:twilio", "provider:stripe"]
rules:
  - {name: read-only, commands: [status], allow: [engineer, approver, auditor]}
  - name: staging-free
    commands: [scale, rollback]
    environments: [staging]
    allow: [engineer]
  - name: production-changes
    commands: [scale, rollback, replay-webhook]
    environments: [production, production-eu]
    allow: [engineer]
    approval: {from: [approver], count: 1, expires: 15m}
    break_glass: [incident-commander]
  - name: big-scale
    commands: [scale]
    environments: [production]
    when: {replicas_above: 10}
    approval: {from: [approver], count: 2}
  - name: sudden-scale
    commands: [scale]
    when: {scale_factor_above: 3}
    approval: {from: [approver], count: 2}
  - name: deep-rollback
    commands: [rollback]
    when: {revisions_back_above: 1}
    approval: {from: [approver, lead], count: 2, each_of: [lead]}
  - name: outside-maintenance-window
    commands: [rollback]
    environments: [production]
    when: {outside_window: {days: [sat], start: "22:00", end: "04:00"}}
    approval: {from: [approver], count: 1, expires: 5m}
  - name: payments-providers
    commands: [disable-provider, enable-provider]
    targets: [payments]
    allow: [engineer]
    approval: {from: [approver, dba], count: 2, each_of: [approver, dba]}
  - name: other-providers
    commands: [disable-provider, enable-provider]
    allow: [engineer]
    channels: [C_INC]
""", env={})

SAT_2300 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)  # a Saturday, inside the window
SUN_0359 = datetime(2026, 11, 22, 3, 59, tzinfo=UTC)  # still inside (the window wraps midnight)
SUN_0400 = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)   # the end is exclusive: outside
SAT_2159 = datetime(2026, 11, 21, 21, 59, tzinfo=UTC)  # one minute before: outside
TUE_1000 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
N, A, B, D = DecisionKind.NEEDS_APPROVAL, DecisionKind.ALLOW, DecisionKind.BREAK_GLASS, DecisionKind.DENY


def scale(alias: str, before: int, after: int, env: str = "production") -> Plan:
    return Plan(command="scale", target=f"deployment/{alias}", target_label=alias, environment=env, params={}, summary="",
                target_name=alias, target_kind="deployments", facts={"replicas_before": before, "replicas_after": after})


def rollback(alias: str, back: int, env: str = "production") -> Plan:
    return Plan(command="rollback", target=f"deployment/{alias}", target_label=alias, environment=env, params={}, summary="",
                target_name=alias, target_kind="deployments", facts={"revisions_back": back})


def provider(name: str, command: str = "disable-provider") -> Plan:
    return Plan(command=command, target=f"provider/{name}", target_label=name, environment="production", params={},
                summary="", target_name=f"provider:{name}", target_kind="providers")


def status(alias: str, env: str = "production") -> Plan:
    return Plan(command="status", target=f"deployment/{alias}", target_label=alias, environment=env, params={}, summary="",
                target_name=alias, target_kind="deployments", mutating=False)


CASES: list[tuple[str, str, Any, dict[str, Any], DecisionKind, int, str]] = [
    # (case, user, subject, kwargs, kind, approvals, text in reason)
    ("engineer scales production: one approval", "U_ENG", scale("worker", 3, 6), {}, N, 1, "production-changes"),
    ("engineer scales staging: no approval", "U_ENG", scale("stg-api", 3, 6, "staging"), {}, A, 0, "staging-free"),
    ("approver alone may not request", "U_APP", scale("worker", 3, 6), {}, D, 0, "your roles: approver"),
    ("auditor reads status", "U_AUD", status("api"), {}, A, 0, "read-only"),
    ("auditor may not scale", "U_AUD", scale("worker", 3, 4), {}, D, 0, "allowed: engineer"),
    ("stranger denied by default", "U_NOBODY", status("api"), {}, D, 0, "your roles: none"),
    ("nobody may enable-provider outside the rules", "U_AUD", provider("twilio", "enable-provider"), {}, D, 0, "allowed: engineer"),
    ("command no rule names: denied by default", "U_ENG", "cancel-everything", {}, D, 0, "denied by default"),
    ("role via Slack user group", "U_GROUPIE", scale("worker", 3, 6), {"groups": ["S_ONCALL"]}, N, 1, "production-changes"),
    ("unknown user group grants nothing", "U_GROUPIE", scale("worker", 3, 6), {"groups": ["S_OTHER"]}, D, 0, "your roles: none"),
    ("a group for approving does not let you request", "U_GROUPIE", scale("worker", 3, 6), {"groups": ["S_LEADS"]}, D, 0,
     "your roles: approver"),
    ("scale above 10 replicas: two approvals", "U_ENG", scale("worker", 8, 11), {}, N, 2, "big-scale"),
    ("scale to exactly 10: one approval", "U_ENG", scale("worker", 8, 10), {}, N, 1, "production-changes"),
    ("scale by more than 3x: two approvals", "U_ENG", scale("worker", 2, 7), {}, N, 2, "sudden-scale"),
    ("scale by exactly 3x: one approval", "U_ENG", scale("worker", 2, 6), {}, N, 1, "production-changes"),
    ("scale down by more than 3x: two approvals", "U_ENG", scale("worker", 8, 2), {}, N, 2, "sudden-scale"),
    ("scale from zero is an infinite factor", "U_ENG", scale("worker", 0, 1), {}, N, 2, "sudden-scale"),
    ("sudden scale in staging still needs approvals", "U_ENG", scale("stg-api", 1, 9, "staging"), {}, N, 2, "sudden-scale"),
    ("rollback one revision back: one approval", "U_ENG", rollback("api", 1), {"now": SAT_2300}, N, 1, "production-changes"),
    ("rollback two back needs a lead", "U_ENG", rollback("api", 2), {"now": SAT_2300}, N, 2, "one from each of lead"),
    ("rollback outside the window: window rule applies", "U_ENG", rollback("api", 1), {"now": TUE_1000}, N, 1,
     "outside-maintenance-window"),
    ("window edge: 23:00 Saturday is inside", "U_ENG", rollback("api", 1), {"now": SAT_2300}, N, 1,
     "required by production-changes."),
    ("window edge: 03:59 Sunday is inside (wraps)", "U_ENG", rollback("api", 1), {"now": SUN_0359}, N, 1,
     "required by production-changes."),
    ("window edge: 04:00 Sunday is outside", "U_ENG", rollback("api", 1), {"now": SUN_0400}, N, 1,
     "production-changes, outside-maintenance-window"),
    ("window edge: 21:59 Saturday is outside", "U_ENG", rollback("api", 1), {"now": SAT_2159}, N, 1,
     "outside-maintenance-window"),
    ("frozen environment refuses mutating commands", "U_ENG", scale("eu-api", 3, 4, "production-eu"), {}, D, 0,
     "EU freeze until the audit closes"),
    ("frozen environment still answers status", "U_ENG", status("eu-api", "production-eu"), {}, A, 0, "read-only"),
    ("break-glass does not thaw a freeze", "U_IC", scale("eu-api", 3, 4, "production-eu"), {"break_glass": True}, D, 0,
     "frozen"),
    ("command from an allowed channel", "U_ENG", scale("worker", 3, 4), {"channel": "C_OPS"}, N, 1, "production-changes"),
    ("command from another channel is refused", "U_ENG", scale("worker", 3, 4), {"channel": "C_RANDOM"}, D, 0,
     "only in <#C_INC>, <#C_OPS>"),
    ("status from another channel is refused too", "U_AUD", status("api"), {"channel": "C_RANDOM"}, D, 0, "only in"),
    ("help works in any channel", "U_NOBODY", "help", {"channel": "C_RANDOM"}, A, 0, "help is open"),
    ("rule-level channel: provider toggle in C_INC", "U_ENG", provider("vonage"), {"channel": "C_INC"}, A, 0, "other-providers"),
    ("rule-level channel: not in C_OPS", "U_ENG", provider("vonage"), {"channel": "C_OPS"}, D, 0, "denied by default"),
    ("target group: payments providers need approver and dba", "U_ENG", provider("twilio"), {"channel": "C_INC"}, N, 2,
     "one from each of approver, dba"),
    ("break-glass by the incident commander", "U_IC", scale("worker", 3, 6), {"break_glass": True}, B, 1,
     "must review it afterwards"),
    ("the incident commander without --break-glass may not", "U_IC", scale("worker", 3, 6), {}, D, 0,
     "you may not run `scale`"),
    ("break-glass by an engineer without the role", "U_ENG", scale("worker", 3, 6), {"break_glass": True}, D, 0,
     "may not break glass"),
    ("break-glass where no approval is needed is just allowed", "U_ENG", scale("stg-api", 3, 4, "staging"),
     {"break_glass": True}, A, 0, "without approval"),
    # A broad rule's break_glass does not undo a stricter matching rule that has none.
    ("break-glass refused: 3→40 also matches big-scale and sudden-scale", "U_IC", scale("worker", 3, 40),
     {"break_glass": True}, D, 0, "big-scale, sudden-scale do not allow break-glass for your roles (incident-commander)"),
    ("break-glass refused: 8→12 also matches big-scale", "U_IC", scale("worker", 8, 12), {"break_glass": True}, D, 0,
     "big-scale does not allow break-glass"),
    ("the refused 3→40 can still be requested normally", "U_ENG", scale("worker", 3, 40), {}, N, 2,
     "required by big-scale, sudden-scale"),
    ("help: approval shown for unconditional rules", "U_ENG", "scale", {}, N, 1, "production-changes"),
    ("help: staging-only rule still lets you see the command", "U_ENG", "rollback", {}, N, 1, "allowed by staging-free"),
    ("help: auditor sees scale is not for them", "U_AUD", "scale", {}, D, 0, "you may not run `scale`"),
]


@pytest.mark.parametrize(("case", "user", "subject", "kwargs", "kind", "approvals", "text"), CASES, ids=[c[0] for c in CASES])
def test_policy(case: str, user: str, subject: Any, kwargs: dict[str, Any], kind: DecisionKind, approvals: int, text: str) -> None:
    actor = Actor(UserId(user), groups=frozenset(kwargs.get("groups", ())))
    d = decide(subject, actor, POLICY, channel_id=kwargs.get("channel", "C_INC"), now=kwargs.get("now", TUE_1000),
               break_glass=kwargs.get("break_glass", False))
    assert (d.kind, d.approvals_required) == (kind, approvals), d.trace
    assert text in d.reason, d.reason


GLASS_POLICY = parse_config("""
roles:
  engineer: {users: [U_ENG]}
  approver: {users: [U_APP]}
  lead: {users: [U_LEAD]}
  incident-commander: {users: [U_IC]}
  sre-lead: {users: [U_SRE]}
environments: {production: {}}
deployments: {worker: {environment: production, namespace: nova, name: nova-worker}}
rules:
  - name: production-changes
    commands: [scale]
    allow: [engineer]
    approval: {from: [approver], count: 1}
    break_glass: [incident-commander]
  - name: big-scale
    commands: [scale]
    when: {replicas_above: 10}
    approval: {from: [approver, lead], count: 2, each_of: [lead]}
    break_glass: [incident-commander, sre-lead]
""", env={})


def test_break_glass_needs_every_approval_rule_to_allow_it_and_its_review_the_strictest_approvers() -> None:
    d = decide(scale("worker", 8, 12), Actor(UserId("U_IC")), GLASS_POLICY, now=TUE_1000, break_glass=True)
    assert d.kind is DecisionKind.BREAK_GLASS, d.trace
    assert d.approver_roles == ("approver", "lead") and d.approvals_required == 2 and d.approvals_each == ("lead",)
    assert d.rule == "production-changes, big-scale"
    assert "break-glass allowed by production-changes, big-scale (every rule asking for approval)" in d.trace


def test_a_break_glass_role_of_the_stricter_rule_only_does_not_skip_the_broader_one() -> None:
    d = decide(scale("worker", 8, 12), Actor(UserId("U_SRE")), GLASS_POLICY, now=TUE_1000, break_glass=True)
    assert d.kind is DecisionKind.DENY and d.rule == "production-changes"
    assert "production-changes does not allow break-glass for your roles (sre-lead)" in d.reason
    below = decide(scale("worker", 3, 6), Actor(UserId("U_SRE")), GLASS_POLICY, now=TUE_1000, break_glass=True)
    assert below.kind is DecisionKind.DENY and "you may not run `scale`" in below.reason  # no rule names sre-lead here


def test_strictest_rule_wins_and_expiry_is_the_shortest() -> None:
    d = decide(rollback("api", 1), Actor(UserId("U_ENG")), POLICY, channel_id="C_INC", now=TUE_1000)
    assert d.expires_in_seconds == 5 * 60  # outside-maintenance-window asks for 5m, production-changes 15m


def test_trace_explains_every_rule_weighed() -> None:
    d = decide(scale("worker", 8, 11), Actor(UserId("U_ENG")), POLICY, channel_id="C_INC", now=TUE_1000)
    trace = "\n".join(d.trace)
    assert "staging-free: other environments (staging)" in trace
    assert "big-scale: matches: replicas 11 > 10" in trace
    assert "sudden-scale: conditions do not hold: scale factor 1.375 not above 3" in trace


@pytest.mark.parametrize(("approver", "requester", "groups", "ok"), [
    ("U_APP", "U_ENG", (), True),
    ("U_BOTH", "U_ENG", (), True),
    ("U_BOTH", "U_BOTH", (), False),  # holds approver, but it is their own request
    ("U_ENG", "U_BOTH", (), False),  # not an approver
    ("U_LEAD", "U_ENG", (), False),  # lead is not in from: [approver]
    ("U_X", "U_ENG", ("S_LEADS",), True),  # approver through a Slack user group
    ("U_X", "U_X", ("S_LEADS",), False),  # still not for their own request
])
def test_who_may_approve(approver: str, requester: str, groups: tuple[str, ...], ok: bool) -> None:
    why = may_approve(Actor(UserId(approver), groups=frozenset(groups)), requester=Actor(UserId(requester)),
                      approver_roles=("approver",), config=POLICY)
    assert (why is None) is ok, why


@pytest.mark.parametrize(("approvers", "count", "each_of", "met"), [
    ([("approver",)], 1, (), True),
    ([("approver",)], 2, (), False),
    ([("approver",), ("approver",)], 2, (), True),
    ([("approver",), ("approver",)], 2, ("lead",), False),
    ([("approver",), ("lead",)], 2, ("lead",), True),
    ([("approver", "dba")], 2, ("approver", "dba"), False),  # one person cannot fill two slots
    ([("approver", "dba"), ("approver",)], 2, ("approver", "dba"), True),  # matching: dba→first, approver→second
    ([("approver",), ("approver", "dba")], 2, ("dba", "approver"), True),
])
def test_quorum(approvers: list[tuple[str, ...]], count: int, each_of: tuple[str, ...], met: bool) -> None:
    assert quorum_met(approvers, count=count, each_of=each_of) is met


def test_policy_table_is_big_enough() -> None:
    assert len(CASES) >= 40
