"""One `/ops` request, front to back: parse → plan → policy decision → approval (or refusal).

Runs after the edge has acked. Every way a request can end here is answered to the user (with
what to type instead) and recorded in the audit trail. Backends that are down make the request
fail closed: the user is told which backend and why, nothing is created.
"""

from __future__ import annotations

import logging

from bot.approvals import Approvals
from bot.audit import Audit
from bot.config import Config
from bot.domain import CommandRequest, DecisionKind, Invocation
from bot.errors import BackendUnavailable, ExecutionError, OpsbotError, PolicyDenied, UserError
from bot.metrics import Metrics
from bot.policy.engine import decide
from bot.ports import Chat, Context
from commands.help import help_text
from commands.registry import command, parse

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, *, config: Config, ctx: Context, chat: Chat, audit: Audit, approvals: Approvals, metrics: Metrics) -> None:
        self.config, self.ctx, self.chat, self.audit, self.approvals, self.metrics = config, ctx, chat, audit, approvals, metrics

    def parse(self, req: CommandRequest) -> Invocation:
        """Pure and fast: the edge calls it before the ack to answer usage errors at once."""
        return parse(req.text, self.config)

    async def _reply(self, req: CommandRequest, text: str, *, public: bool = False) -> None:
        await self.chat.respond(response_url=req.response_url, channel_id=req.channel_id, user_id=req.actor.user_id,
                                text=text, public=public)

    async def record_invalid(self, req: CommandRequest, error: UserError) -> None:
        """A command that did not parse (the user was already told, in the ack): audit only."""
        self.metrics.requests.labels("unknown", "invalid").inc()
        try:
            await self.audit.record("invalid", actor=req.actor, channel_id=req.channel_id, text=req.text,
                                    result={"error": str(error)})
        except BackendUnavailable:
            log.exception("could not record an invalid command in the audit trail")

    async def handle(self, req: CommandRequest, inv: Invocation) -> None:
        try:
            await self._handle(req, inv)
        except BackendUnavailable as exc:
            self.metrics.requests.labels(inv.command, "backend_unavailable").inc()
            await self._reply(req, f":x: Refused: {exc}. Nothing was changed; try again when it is back.")
        except OpsbotError as exc:
            await self._reply(req, f":x: {exc}")
        except Exception:
            log.exception("unexpected error handling %r", req.text)
            await self._reply(req, ":x: opsbot hit an internal error; nothing was changed. The error is in opsbot's logs.")

    async def _handle(self, req: CommandRequest, inv: Invocation) -> None:
        if inv.command == "help":
            await self._reply(req, help_text(lambda name: decide(name, req.actor, self.config)))
            return
        cmd = command(inv.command)
        # Policy first on the command alone, so people who may not run it learn nothing by planning.
        pre = decide(inv.command, req.actor, self.config)
        if pre.kind is DecisionKind.DENY:
            await self._denied(req, inv, PolicyDenied(pre.reason, rule=pre.rule), plan=None)
            return
        try:
            plan = await cmd.plan(inv.params, self.ctx)
        except UserError as exc:
            await self._invalid(req, exc, inv=inv)
            return
        except ExecutionError as exc:
            raise BackendUnavailable("the target", str(exc)) from exc
        decision = decide(plan, req.actor, self.config)
        if decision.kind is DecisionKind.DENY:
            await self._denied(req, inv, PolicyDenied(decision.reason, rule=decision.rule), plan=plan.to_json())
            return
        if not plan.mutating:
            self.metrics.requests.labels(inv.command, "read").inc()
            await self.audit.record("read", actor=req.actor, channel_id=req.channel_id, text=inv.text, plan=plan.to_json(), post=False)
            await self._reply(req, f"*{plan.summary}*\n" + "\n".join(f"• {d}" for d in plan.details), public=True)
            return
        if inv.flags.dry_run:
            self.metrics.requests.labels(inv.command, "dry_run").inc()
            approval = (f"needs {decision.approvals_required} approval(s) from {', '.join(decision.approver_roles)}"
                        if decision.kind is DecisionKind.NEEDS_APPROVAL else "would run without approval")
            await self._reply(req, f":mag: Dry run — nothing was changed.\n*{plan.summary}*\n"
                              + "\n".join(f"• {d}" for d in plan.details) + f"\n• policy: {approval} ({decision.rule})")
            return
        self.metrics.requests.labels(inv.command, "requested").inc()
        await self.approvals.open(req, inv, plan, decision)

    async def _invalid(self, req: CommandRequest, error: UserError, inv: Invocation) -> None:
        self.metrics.requests.labels(inv.command, "invalid").inc()
        await self.audit.record("invalid", actor=req.actor, channel_id=req.channel_id, text=req.text,
                                result={"error": str(error)})
        await self._reply(req, f":x: {error}")

    async def _denied(self, req: CommandRequest, inv: Invocation, error: PolicyDenied, plan: dict[str, object] | None) -> None:
        self.metrics.requests.labels(inv.command, "policy_denied").inc()
        await self.audit.record("policy_denied", actor=req.actor, channel_id=req.channel_id, text=inv.text, plan=plan,
                                result={"error": str(error), "rule": error.rule})
        await self._reply(req, f":no_entry: Not allowed: {error}")
