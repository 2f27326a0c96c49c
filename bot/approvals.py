"""The request lifecycle up to execution: open a request, count clicks, expire.

State lives in PostgreSQL (``Store``); this module decides what each outcome means for people: the
card, the thread, the ephemeral refusals, the audit rows, and handing an approved request to the
action queue.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Protocol

from bot.adapters.store import Store, VoteResult
from bot.audit import Audit
from bot.config import Config
from bot.domain import SYSTEM, Actor, CommandRequest, Decision, DecisionKind, Invocation, OpsRequest, Plan, RequestState
from bot.errors import BackendUnavailable
from bot.metrics import Metrics
from bot.policy.engine import may_approve
from bot.ports import Chat

log = logging.getLogger(__name__)
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


class Enqueue(Protocol):
    async def enqueue(self, request_id: str) -> None: ...


def new_request_id() -> str:
    return "r-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


class Approvals:
    def __init__(self, *, config: Config, store: Store, chat: Chat, audit: Audit, actions: Enqueue, metrics: Metrics) -> None:
        self.config, self.store, self.chat, self.audit, self.actions, self.metrics = config, store, chat, audit, actions, metrics

    async def open(self, req: CommandRequest, inv: Invocation, plan: Plan, decision: Decision) -> OpsRequest:
        needs_approval = decision.kind is DecisionKind.NEEDS_APPROVAL
        request = await self.store.create_request(
            id=new_request_id(), command=inv.command, text=inv.text, requester=req.actor, channel_id=req.channel_id,
            plan=plan.to_json(), reason=inv.flags.reason,
            state=RequestState.PENDING_APPROVAL if needs_approval else RequestState.APPROVED,
            approvals_required=decision.approvals_required, approver_roles=decision.approver_roles,
            rule=decision.rule, expires_in=decision.expires_in_seconds,
        )
        await self.audit.record("requested", actor=req.actor, channel_id=req.channel_id, request_id=request.id,
                                text=inv.text, plan=request.plan,
                                result={"reason": inv.flags.reason, "rule": decision.rule, "decision": decision.reason})
        channel, ts = await self.chat.post_card(request)
        await self.store.set_card(request.id, channel, ts)
        if not needs_approval:
            await self.audit.record("approved", actor=req.actor, channel_id=req.channel_id, request_id=request.id,
                                    text=inv.text, plan=request.plan, result={"by": "policy", "rule": decision.rule})
            await self._enqueue(request)
        return await self._reload(request.id)

    async def _enqueue(self, request: OpsRequest) -> None:
        """Hand an approved request to the worker. The approval is already committed; if Redis is
        down now, the sweeper re-enqueues it when Redis is back (same job id, so never twice)."""
        try:
            await self.actions.enqueue(request.id)
        except BackendUnavailable as exc:
            log.warning("could not enqueue approved request %s: %s", request.id, exc)
            await self.chat.post_in_thread(request, f":hourglass: Approved, but {exc}. opsbot will queue it as soon as the "
                                                    "queue is reachable again; nothing has run yet.")

    async def _reload(self, request_id: str) -> OpsRequest:
        request = await self.store.get(request_id)
        assert request is not None
        return request

    async def click(self, request_id: str, actor: Actor, decision: str, *, channel_id: str) -> VoteResult:
        if decision not in ("approve", "deny"):
            raise ValueError(decision)

        def eligible(request: OpsRequest) -> str | None:
            return may_approve(actor, requester=request.requester, approver_roles=request.approver_roles, config=self.config)

        result = await self.store.vote(request_id, actor, decision, eligible)
        request = result.request
        if result.outcome in ("missing", "closed", "ineligible", "duplicate") or request is None:
            await self.chat.post_ephemeral(channel_id=channel_id, user_id=actor.user_id, text=result.message)
            return result
        if result.outcome == "expired":
            await self._expired(request)
            await self.chat.post_ephemeral(channel_id=channel_id, user_id=actor.user_id, text=result.message)
            return result
        common: dict[str, Any] = {"actor": actor, "channel_id": channel_id, "request_id": request.id,
                                  "text": request.text, "plan": request.plan}
        if result.outcome == "denied":
            await self.audit.record("denied", **common)
            self.metrics.requests.labels(request.command, "denied").inc()
            await self.chat.update_card(request)
            await self.chat.post_in_thread(request, f":no_entry: Denied by {actor.mention()}. Nothing was run.")
            return result
        await self.audit.record("approval_given", **common,
                                result={"approvals": sum(a.decision == "approve" for a in request.approvals),
                                        "required": request.approvals_required})
        if result.outcome == "approved":
            self.metrics.approval_latency.observe(max(0.0, (request.approvals[-1].at - request.created_at).total_seconds()))
            await self.audit.record("approved", **common, result={"approvers": [a.approver.user_id for a in request.approvals]})
            await self.chat.update_card(request)
            await self._enqueue(request)
        else:
            await self.chat.update_card(request)
        return result

    async def _expired(self, request: OpsRequest) -> None:
        await self.audit.record("expired", actor=SYSTEM,
                                channel_id=request.channel_id, request_id=request.id, text=request.text, plan=request.plan)
        self.metrics.requests.labels(request.command, "expired").inc()
        await self.chat.update_card(request)
        await self.chat.post_in_thread(request, ":alarm_clock: Expired without enough approvals. Nothing was run; "
                                                f"request again if it is still needed: `/ops {request.text}`")

    async def expire_due(self) -> int:
        n = 0
        for request_id in await self.store.due_for_expiry():
            request = await self.store.transition(request_id, from_state=RequestState.PENDING_APPROVAL, to_state=RequestState.EXPIRED)
            if request is not None:  # another replica may have expired it first
                await self._expired(request)
                n += 1
        return n
