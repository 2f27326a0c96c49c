"""Domain values, frozen. Nothing here knows Slack, Kubernetes or SQL."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NewType

UserId = NewType("UserId", str)
ChannelId = NewType("ChannelId", str)
RequestId = NewType("RequestId", str)


@dataclass(frozen=True)
class Actor:
    user_id: UserId
    name: str = ""
    groups: frozenset[str] = frozenset()  # Slack user group ids, resolved before the policy is asked

    def mention(self) -> str:
        return f"<@{self.user_id}>"


@dataclass(frozen=True, kw_only=True)
class CommandRequest:
    """One `/ops …` invocation, as the edge hands it over (Slack's dict never travels further)."""

    actor: Actor
    channel_id: ChannelId
    text: str
    team_id: str = ""
    response_url: str = ""
    # Slack's trigger_id: the same on every delivery of one invocation (a retry, a redelivered envelope).
    delivery_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Flags:
    reason: str = ""
    dry_run: bool = False
    break_glass: str = ""  # the reason given with --break-glass; empty when not breaking glass


@dataclass(frozen=True, kw_only=True)
class Invocation:
    """The parsed command line: which command, its own parameters, and the common flags."""

    command: str
    params: dict[str, Any]
    flags: Flags
    text: str


def canonical_json(value: Any) -> str:
    """The one JSON form hashes are computed over: sorted keys, no spaces, UTF-8, ``str()`` for the rest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a command will do, computed from a read-only look at the target.

    ``before``/``after`` are what the card shows; ``observed`` is the state the plan was computed
    from (resourceVersion, revision, row status). ``fingerprint`` covers ``before`` and the
    ``matters`` subset of ``observed``: the worker re-plans just before executing and refuses when
    it differs, so an approval covers this plan, not any plan.
    """

    command: str
    target: str  # a stable key, e.g. "deployment/nova/nova-worker"; one action per target at a time
    target_label: str  # what people call it: "worker (nova/nova-worker)"
    environment: str
    target_name: str = ""  # what policy rules name: "worker", "provider:twilio", "webhooks"
    target_kind: str = ""  # "deployments", "providers", "webhooks"
    facts: dict[str, Any] = field(default_factory=dict)  # what `when:` conditions read (replicas_after, revisions_back…)
    params: dict[str, Any]
    summary: str  # one line: "nova-worker: 3 → 6 replicas"
    details: tuple[str, ...] = ()
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    observed: dict[str, Any] = field(default_factory=dict)
    mutating: bool = True
    noop_reason: str = ""  # set when there is nothing to do (already in the wanted state)
    # A read-only command's long output (log lines): posted in a thread under the answer, scrubbed
    # of secrets, and never stored in the audit trail (logs can hold personal data; the audit row
    # keeps the parameters and ``facts`` such as the line count).
    attachment: str = ""

    @property
    def fingerprint(self) -> str:
        return sha256_hex({"command": self.command, "target": self.target, "before": self.before, "observed": self.observed})

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "target": self.target,
            "target_label": self.target_label,
            "environment": self.environment,
            "params": self.params,
            "summary": self.summary,
            "details": list(self.details),
            "before": self.before,
            "after": self.after,
            "observed": self.observed,
            "mutating": self.mutating,
            "target_name": self.target_name,
            "target_kind": self.target_kind,
            "facts": self.facts,
            "fingerprint": self.fingerprint,
        }


class DecisionKind(StrEnum):
    ALLOW = "allow"
    NEEDS_APPROVAL = "needs_approval"
    BREAK_GLASS = "break_glass"  # runs without waiting; approvers review it after the fact
    DENY = "deny"


@dataclass(frozen=True, kw_only=True)
class Decision:
    kind: DecisionKind
    reason: str
    rule: str | None = None  # the rule's name, for the audit and `policy explain`
    approver_roles: tuple[str, ...] = ()
    approvals_required: int = 0
    approvals_each: tuple[str, ...] = ()  # at least one approval from each of these roles
    expires_in_seconds: int = 15 * 60
    max_open_per_user: int | None = None
    remind_after: int | None = None  # seconds until the approvers (or break-glass reviewers) get a direct message
    escalate_after: int | None = None  # seconds until escalate_to is told and may approve too
    escalate_to: tuple[str, ...] = ()
    trace: tuple[str, ...] = ()  # how each rule was weighed, for `opsbot policy explain`

    @property
    def allowed(self) -> bool:
        return self.kind is not DecisionKind.DENY


class RequestState(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    STALE = "stale"
    UNKNOWN = "unknown"

    @property
    def final(self) -> bool:
        return self not in (RequestState.PENDING_APPROVAL, RequestState.APPROVED, RequestState.RUNNING)


@dataclass(frozen=True, kw_only=True)
class OpsRequest:
    """A request as stored in PostgreSQL (the source of truth)."""

    id: RequestId
    command: str
    text: str
    requester: Actor
    channel_id: ChannelId
    plan: dict[str, Any]
    reason: str
    state: RequestState
    approvals_required: int
    approver_roles: tuple[str, ...]
    rule: str | None
    created_at: datetime
    expires_at: datetime
    approvals: tuple[Approval, ...] = ()
    approvals_each: tuple[str, ...] = ()
    break_glass: str = ""
    review_state: str | None = None  # break-glass: "needed" → "acknowledged"
    reviewed_by: str | None = None
    audit_permalink: str | None = None  # the request's record in the audit channel
    card_channel: str | None = None
    card_ts: str | None = None
    card_version: int = 0  # bumped by every change the card shows (bot/notices.py)
    undo_of: str | None = None  # the request this one undoes (bot/undo.py)
    undo_of_link: str | None = None  # the permalink of that request's card
    result: dict[str, Any] | None = None
    error: str | None = None
    approvers_named: tuple[str, ...] = ()  # user ids and user group ids (S…) who may approve, for the card
    remind_after: int | None = None  # seconds (the rule's approval block, when the request was opened)
    escalate_after: int | None = None
    escalate_to: tuple[str, ...] = ()
    escalated_at: datetime | None = None
    deny_reason: str | None = None

    @property
    def summary(self) -> str:
        return str(self.plan.get("summary", self.text))


@dataclass(frozen=True, kw_only=True)
class Approval:
    approver: Actor
    decision: str  # "approve" | "deny"
    at: datetime
    roles: tuple[str, ...] = ()  # the approver's roles when they clicked


@dataclass(frozen=True, kw_only=True)
class Outcome:
    ok: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Progress:
    """One observation of what an executed change is doing now (a rollout, a job), for its thread.
    The last one a command's ``follow`` yields has ``done`` set; ``failed`` says it went wrong."""

    text: str
    done: bool = False
    failed: bool = False


REQUEST_ID_PATTERN = r"r-[a-z0-9]{4,32}"  # what new_request_id makes (bot/approvals.py), with room to grow

SYSTEM = Actor(UserId("opsbot"), "opsbot")  # the actor of events nobody clicked: expiry, worker steps
