"""The request lifecycle up to execution: open a request, count clicks, expire, cancel, and the
after-the-fact review of break-glass runs.

State lives in PostgreSQL (``Store``); this module decides what each outcome means for people: the
card, the thread, the ephemeral refusals, the audit rows, and handing an approved request to the
action queue. Who may approve is decided by ``bot.policy`` (``may_approve``, ``quorum_met``) with the
clicker's roles resolved at click time, Slack user groups included: if those cannot be checked the
click is refused, never counted on a guess.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from bot.adapters.store import Store, VoteResult
from bot.audit import Audit, Permalinks
from bot.config import Config
from bot.domain import (
    REQUEST_ID_PATTERN,
    SYSTEM,
    Actor,
    CommandRequest,
    Decision,
    DecisionKind,
    Invocation,
    OpsRequest,
    Plan,
    RequestState,
)
from bot.errors import BackendUnavailable, CardNotPosted, OpsbotError
from bot.messages import code, mrkdwn, plural, usergroup_problems
from bot.metrics import Metrics
from bot.notices import Notices
from bot.policy.engine import may_approve, quorum_met
from bot.ports import Chat, Directory, tell
from bot.reminders import Reminders, approvers_named

log = logging.getLogger(__name__)
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


class Enqueue(Protocol):
    async def enqueue(self, request_id: str) -> None: ...


def new_request_id() -> str:
    return "r-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


class Approvals:
    def __init__(self, *, config: Config, store: Store, chat: Chat, audit: Audit, actions: Enqueue, metrics: Metrics,
                 directory: Directory, notices: Notices) -> None:
        self.config, self.store, self.chat, self.audit, self.actions, self.metrics = config, store, chat, audit, actions, metrics
        self.directory, self.notices = directory, notices
        self.permalinks = Permalinks(chat)
        self.reminders = Reminders(config=config, store=store, chat=chat, audit=audit, directory=directory, notices=notices,
                                   permalinks=self.permalinks)

    async def with_groups(self, actor: Actor) -> Actor:
        """The actor with their Slack user groups (only when the policy names any)."""
        if not self.config.usergroups:
            return actor
        return replace(actor, groups=await self.directory.groups_of(actor.user_id))

    def usergroup_problems(self) -> dict[str, str]:
        """Configured user groups that grant nothing because the configuration is wrong (group →
        Slack's error), as of the last ``with_groups``."""
        return self.directory.problems() if self.config.usergroups else {}

    def usergroup_note(self) -> str:
        """For a person refused or shown their roles: which configured user groups grant nothing
        because the configuration is wrong, and who fixes it ("" when none)."""
        problems = self.usergroup_problems()
        if not problems:
            return ""
        naming = {g: [r for r, role in self.config.roles.items() if g in role.usergroups] for g in problems}
        return "".join(f"\n:warning: {line}" for line in usergroup_problems(problems, naming))

    async def open(self, req: CommandRequest, inv: Invocation, plan: Plan, decision: Decision, *,
                   undo_of: str | None = None, undo_of_link: str | None = None) -> OpsRequest:
        needs_approval = decision.kind is DecisionKind.NEEDS_APPROVAL
        glass = inv.flags.break_glass if decision.kind is DecisionKind.BREAK_GLASS else ""
        request = await self.store.create_request(
            id=new_request_id(), command=inv.command, text=inv.text, requester=req.actor, channel_id=req.channel_id,
            plan=plan.to_json(), reason=inv.flags.reason or glass,
            state=RequestState.PENDING_APPROVAL if needs_approval else RequestState.APPROVED,
            approvals_required=decision.approvals_required, approver_roles=decision.approver_roles,
            approvals_each=decision.approvals_each, rule=decision.rule, expires_in=decision.expires_in_seconds,
            break_glass=glass, delivery_id=req.delivery_id, remind_after=decision.remind_after,
            escalate_after=decision.escalate_after, escalate_to=decision.escalate_to,
            approvers_named=approvers_named(self.config, decision.approver_roles, req.actor.user_id),
            undo_of=undo_of, undo_of_link=undo_of_link,
        )
        await self.audit.record("requested", actor=req.actor, channel_id=req.channel_id, request_id=request.id,
                                text=inv.text, plan=request.plan,
                                result={"reason": inv.flags.reason, "rule": decision.rule, "decision": decision.reason,
                                        **({"undo_of": undo_of} if undo_of else {})})
        try:  # before the card: once people can see it, its reminders are due (a request ended early ends them)
            await self.reminders.schedule(request)
        except BackendUnavailable as exc:  # the request stands; only its reminders are missing, and the log says so
            log.error("request %s: reminders not scheduled: %s", request.id, exc)
        try:
            channel, ts = await self.chat.post_card(request)
        except OpsbotError as exc:
            # Without a card nobody can approve it, and a request that runs unseen is worse: end it now.
            ended = await self.store.transition(request.id, from_state=request.state, to_state=RequestState.FAILED,
                                                error=f"the approval card could not be posted: {exc}")
            if ended is not None:
                await self.audit.record("failed", actor=SYSTEM, channel_id=req.channel_id, request_id=request.id, text=inv.text,
                                        plan=request.plan, result={"error": ended.error})
            raise CardNotPosted(f"request `{request.id}` was not opened: the approval card could not be posted ({exc}). "
                                "Nothing was changed; try again.") from exc
        reloaded = await self.store.set_card(request.id, channel, ts)  # the row as it is now, in the same round trip
        assert reloaded is not None
        request = reloaded
        if glass:
            await self.audit.record("break_glass", actor=req.actor, channel_id=req.channel_id, request_id=request.id,
                                    text=inv.text, plan=request.plan,
                                    result={"reason": glass, "rule": decision.rule, "reviewers": list(decision.approver_roles)})
            await self.notices.thread(request, f":rotating_light: Break-glass by {req.actor.mention()}: {mrkdwn(glass)}. "
                                               f"It runs now; {', '.join(decision.approver_roles)} must review it "
                                               "(Acknowledge on the card).")
        elif not needs_approval:
            await self.audit.record("approved", actor=req.actor, channel_id=req.channel_id, request_id=request.id,
                                    text=inv.text, plan=request.plan, result={"by": "policy", "rule": decision.rule})
        if not needs_approval:
            await self._enqueue(request)
        return request

    async def _reload(self, request_id: str) -> OpsRequest:
        request = await self.store.get(request_id)
        assert request is not None
        return request

    async def _enqueue(self, request: OpsRequest) -> None:
        """Hand an approved request to the worker. The approval is already committed; if Redis is
        down now, the sweeper re-enqueues it when Redis is back (same job id, so never twice)."""
        try:
            await self.actions.enqueue(request.id)
        except BackendUnavailable as exc:
            log.warning("could not enqueue approved request %s: %s", request.id, exc)
            await self.notices.thread(request, f":hourglass: Approved, but {exc}. opsbot will queue it as soon as the "
                                               "queue is reachable again; nothing has run yet.")

    async def click(self, request_id: str, actor: Actor, decision: str, *, channel_id: str, message_ts: str,
                    reason: str | None = None, home_view: str | None = None) -> VoteResult:
        """An Approve/Deny click on the message ``(channel_id, message_ts)``, or, with ``home_view``,
        in that Home tab view (bot/home.py): it counts only if it is the view opsbot last published
        for this person. Every click that does not count is told why (privately) and recorded
        (``vote_refused``). ``reason``: a deny's, from the Deny dialog (checked by the edge)."""
        if decision not in ("approve", "deny"):
            raise ValueError(decision)
        if not re.fullmatch(REQUEST_ID_PATTERN, request_id):
            return await self._refused(VoteResult("forged", None, "this button does not name an opsbot request; nothing was counted."),
                                       actor, decision, channel_id=channel_id, given=request_id)
        if home_view is not None and home_view != await self.store.home_view_of(actor.user_id):
            return await self._refused(VoteResult("forged", None, "this Approve button is not on the Home tab opsbot showed you; "
                                                                  "nothing was counted."),
                                       actor, decision, channel_id=channel_id, given=request_id, message_ts=home_view)
        try:
            actor = await self.with_groups(actor)
        except BackendUnavailable as exc:
            return await self._refused(VoteResult("unverified", await self.store.get(request_id),
                                                  f":x: Your click was not counted: {exc}. opsbot does not guess who is in a "
                                                  "user group; try again in a moment."),
                                       actor, decision, channel_id=channel_id, given=request_id)
        roles = tuple(sorted(self.config.roles_of(actor.user_id, actor.groups)))

        def eligible(request: OpsRequest) -> str | None:
            return may_approve(actor, requester=request.requester, approver_roles=request.approver_roles, config=self.config)

        def quorum(request: OpsRequest, approving: list[tuple[str, ...]]) -> bool:
            return quorum_met(approving, count=request.approvals_required, each_of=request.approvals_each)

        card = None if home_view is not None else (channel_id, message_ts)  # a Home tab click: its view was checked above
        result = await self.store.vote(request_id, actor, decision, roles=roles, card=card,
                                       eligible=eligible, quorum=quorum, reason=reason if decision == "deny" else None)
        request = result.request
        if result.outcome == "expired" and request is not None:
            await self._expired(request)
        if result.outcome in ("missing", "closed", "ineligible", "duplicate", "forged", "expired") or request is None:
            if result.outcome == "ineligible":
                result = replace(result, message=result.message + self.usergroup_note())
            return await self._refused(result, actor, decision, channel_id=channel_id, given=request_id, message_ts=message_ts)
        common: dict[str, Any] = {"actor": actor, "channel_id": channel_id, "request_id": request.id,
                                  "text": request.text, "plan": request.plan}
        if result.outcome == "denied":
            await self.audit.record("denied", **common, result={"roles": list(roles), "reason": reason})
            self.metrics.requests.labels(request.command, "denied").inc()
            self.notices.card_changed()
            because = f" Reason: {mrkdwn(reason)}." if reason else ""
            await self.notices.thread(request, f":no_entry: Denied by {actor.mention()}.{because} Nothing was run.")
            return result
        approvals = sum(a.decision == "approve" for a in request.approvals)
        await self.audit.record("approval_given", **common,
                                result={"approvals": approvals, "required": request.approvals_required, "roles": list(roles)})
        self.notices.card_changed()
        if result.outcome == "approved":
            self.metrics.approval_latency.observe(max(0.0, (request.approvals[-1].at - request.created_at).total_seconds()))
            await self.audit.record("approved", **common, result={"approvers": [a.approver.user_id for a in request.approvals]})
            await self._enqueue(request)
        elif approvals >= request.approvals_required and request.approvals_each:
            await self.notices.thread(request, f":hourglass: {plural(approvals, 'approval')}, but one from each of "
                                               f"{', '.join(request.approvals_each)} is still needed.")
        return result

    async def _refused(self, result: VoteResult, actor: Actor, decision: str, *, channel_id: str, given: str,
                       message_ts: str = "") -> VoteResult:
        """A click that did not count: the clicker is told why, the attempt is recorded."""
        request = result.request
        known = request is not None and result.outcome != "forged"
        await self.audit.record(
            "vote_refused", actor=actor, channel_id=channel_id, request_id=request.id if known and request else None,
            text=request.text if known and request else "", plan=request.plan if known and request else None,
            result={"decision": decision, "why": result.outcome, "message": result.message, "request_id_given": given,
                    "clicked_on": {"channel": channel_id, "ts": message_ts}})
        self.metrics.requests.labels(request.command if request else "unknown", f"vote_{result.outcome}").inc()
        await tell(self.chat.post_ephemeral(channel_id=channel_id, user_id=actor.user_id, text=f":x: {result.message}"))
        return result

    async def acknowledge(self, request_id: str, actor: Actor, *, channel_id: str, message_ts: str) -> OpsRequest | None:
        """A reviewer acknowledges a break-glass run after the fact (on the request's own card)."""
        request = await self.store.get(request_id) if re.fullmatch(REQUEST_ID_PATTERN, request_id) else None
        why = ""
        if request is None or request.review_state != "needed":
            why = "there is no open break-glass review for that request."
        elif (request.card_channel, request.card_ts) != (channel_id, message_ts):
            why = f"this button does not belong to request `{request_id}`'s card; nothing was recorded."
        if not why:
            try:
                actor = await self.with_groups(actor)
            except BackendUnavailable as exc:
                why = f"not recorded: {exc}."
        if not why:
            assert request is not None
            why = (may_approve(actor, requester=request.requester, approver_roles=request.approver_roles, config=self.config)
                   or "").replace("approve", "review")
            why += self.usergroup_note() if why else ""
        done = None if why else await self.store.acknowledge(request_id, actor.user_id)
        if done is None:
            await self.audit.record("review_refused", actor=actor, channel_id=channel_id,
                                    request_id=request.id if request else None, text=request.text if request else "",
                                    result={"why": why or "someone already reviewed it.", "request_id_given": request_id})
            await tell(self.chat.post_ephemeral(channel_id=channel_id, user_id=actor.user_id,
                                                text=f":x: {why or 'someone already reviewed it.'}"))
            return None
        await self.audit.record("break_glass_reviewed", actor=actor, channel_id=channel_id, request_id=request_id,
                                text=done.text, plan=done.plan)
        self.notices.card_changed()
        await self.notices.thread(done, f":white_check_mark: Break-glass reviewed by {actor.mention()}.")
        return done

    async def cancel(self, request_id: str, actor: Actor, *, channel_id: str) -> str:
        """The requester withdraws a request that has not started. Returns what to tell them."""
        done = await self.store.cancel(request_id, actor.user_id)
        if done is None:
            request = await self.store.get(request_id)
            if request is None:
                why = f"there is no request `{request_id}`. `/ops pending` lists open ones."
            elif request.requester.user_id != actor.user_id:
                why = f"`{request_id}` is {request.requester.mention()}'s request; only they can cancel it."
            else:
                why = f"`{request_id}` is already {request.state.value.replace('_', ' ')}; it can no longer be cancelled."
            await self.audit.record("cancel_refused", actor=actor, channel_id=channel_id, request_id=request.id if request else None,
                                    text=f"cancel {request_id}", plan=request.plan if request else None, result={"why": why})
            return f":x: {why}"
        self.metrics.requests.labels(done.command, "cancelled").inc()
        await self.audit.record("cancelled", actor=actor, channel_id=channel_id, request_id=done.id, text=done.text, plan=done.plan)
        self.notices.card_changed()
        await self.notices.thread(done, f":heavy_multiplication_x: Cancelled by {actor.mention()}. Nothing was run.")
        return f":heavy_multiplication_x: Cancelled `{done.id}` ({mrkdwn(done.summary)})."

    async def deny_problem(self, request_id: str, actor: Actor, *, channel_id: str, message_ts: str) -> str | None:
        """Before the Deny dialog opens: None when this click could count (the same checks as the
        vote, read-only), else a word why not (the vote itself then refuses and records it)."""
        if not re.fullmatch(REQUEST_ID_PATTERN, request_id):
            return "forged"
        request = await self.store.get(request_id)
        if request is None or (request.card_channel, request.card_ts) != (channel_id, message_ts):
            return "forged"
        if request.state is not RequestState.PENDING_APPROVAL or request.expires_at <= self.now():
            return "closed"
        try:
            actor = await self.with_groups(actor)
        except BackendUnavailable:
            return "unverified"
        if may_approve(actor, requester=request.requester, approver_roles=request.approver_roles, config=self.config):
            return "ineligible"
        if any(a.approver.user_id == actor.user_id for a in request.approvals):
            return "duplicate"
        return None

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)

    async def card_link(self, request: OpsRequest) -> str | None:
        """A link to the request's card (None when it has none or Slack cannot say)."""
        if not (request.card_channel and request.card_ts):
            return None
        return await self.permalinks.get(request.card_channel, request.card_ts)

    async def pending_for(self, actor: Actor) -> list[OpsRequest]:
        """Open requests this person may approve (not their own)."""
        return [r for r in await self.store.pending()
                if may_approve(actor, requester=r.requester, approver_roles=r.approver_roles, config=self.config) is None
                and not any(a.approver.user_id == actor.user_id for a in r.approvals)]

    async def _expired(self, request: OpsRequest) -> None:
        await self.audit.record("expired", actor=SYSTEM, channel_id=request.channel_id, request_id=request.id, text=request.text,
                                plan=request.plan)
        self.metrics.requests.labels(request.command, "expired").inc()
        self.notices.card_changed()
        await self.notices.thread(request, ":alarm_clock: Expired without enough approvals. Nothing was run; "
                                           f"request again if it is still needed: {code('/ops ' + request.text)}")

    async def expire_due(self) -> int:
        n = 0
        for request_id in await self.store.due_for_expiry():
            request = await self.store.transition(request_id, from_state=RequestState.PENDING_APPROVAL, to_state=RequestState.EXPIRED)
            if request is not None:  # another replica may have expired it first
                await self._expired(request)
                n += 1
        return n
