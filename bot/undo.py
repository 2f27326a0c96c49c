"""Undo: `/ops undo <request-id>` and the Undo button on a succeeded request's card.

An undo is a new request, typed for the person who asked for it: the original command's
``inverse`` (commands/base.py) gives the ``/ops`` text that puts back what it changed (``scale
worker 3`` after ``scale worker 6``), which is parsed again like anything typed and then goes the
way every request goes (bot/pipeline.py ``_handle``): policy on the command, plan, the stale check
below, the full decision, the limits, ``approvals.open``. So an undo in production needs the same
approvers as the change it undoes; nothing about it is trusted because it is "only an undo".

What this module adds around that path:

* **Refusals before anything is read.** The id names no request, the request did not succeed
  (failed, denied, stale, unknown, pending: there is nothing to put back, or nobody knows what),
  its command has no safe inverse (a replayed webhook, a restart, an http action), or it was
  undone already. Each refusal is answered and audited (``undo_refused``, on the original's
  trail when there is one).
* **Stale.** The inverse's fresh plan reads the target as it is now; if that is not what the
  original left (``Command.moved_on``: the replicas are 4 now, not the 6 it set), the undo would
  put back an old value over someone else's change. Refused, saying what changed; nothing is
  requested.
* **The link, both ways.** The new request carries ``undo_of`` (its row, its ``requested`` audit
  row, its card: "Undo of `r-…`" with a link to the original's card); the original's trail gets
  ``undo_requested`` naming the new request.
* **Once.** At most one undo of a request is open or succeeded (a partial unique index, migration
  010): two fast clicks on Undo, or two replicas handling them, open one request; the other click
  is told which one.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, replace

from bot.adapters.store import Store
from bot.audit import Audit
from bot.config import Config
from bot.domain import CommandRequest, Flags, Invocation, OpsRequest, Plan, RequestState
from bot.errors import OpsbotError, UserError
from bot.messages import code, mrkdwn
from bot.ports import Chat, tell
from commands.base import Command
from commands.registry import command, parse

log = logging.getLogger(__name__)

_NOT_DONE = {
    RequestState.PENDING_APPROVAL: "is still waiting for approval; nothing has run, so there is nothing to undo "
                                   "(withdraw it with `/ops cancel {id}` if it is yours)",
    RequestState.APPROVED: "is approved but has not run yet; nothing to undo",
    RequestState.RUNNING: "is running right now; undo it once it has succeeded",
    RequestState.FAILED: "failed, so opsbot does not know what it changed, if anything; check the target and request what "
                         "it needs",
    RequestState.DENIED: "was denied; nothing was run, so there is nothing to undo",
    RequestState.EXPIRED: "expired without approval; nothing was run, so there is nothing to undo",
    RequestState.CANCELLED: "was cancelled; nothing was run, so there is nothing to undo",
    RequestState.STALE: "was not run (the target had changed after approval); there is nothing to undo",
    RequestState.UNKNOWN: "has an unknown outcome (its worker was lost mid-action); check the target by hand: opsbot does "
                          "not undo what it cannot tell happened",
}


@dataclass(frozen=True)
class UndoStart:
    """An undo that passed the checks that need no backend but opsbot's own database."""

    original: OpsRequest
    command: Command
    invocation: Invocation  # the inverse, as if typed by the person asking for the undo
    asked: Invocation  # what they typed (`undo r-…`) or clicked


class Undos:
    def __init__(self, *, config: Config, store: Store, audit: Audit, chat: Chat) -> None:
        self.config, self.store, self.audit, self.chat = config, store, audit, chat

    async def start(self, req: CommandRequest, asked: Invocation) -> UndoStart | None:
        """The inverse invocation of ``asked``'s request, or None when the undo is refused (the
        person was told why and the refusal audited)."""
        given = str(asked.params["request_id"])
        original = await self.store.get(given)
        if original is None:
            await self.refuse(req, asked, None, f"there is no request `{given}`. The id is on the request's card and in "
                                                "`/ops audit`.", why="missing")
            return None
        if original.state is not RequestState.SUCCEEDED:
            why = _NOT_DONE.get(original.state, f"is {original.state.value}").format(id=original.id)
            await self.refuse(req, asked, original, f"`{original.id}` ({mrkdwn(original.summary)}) {why}.", why=original.state.value)
            return None
        try:
            cmd = command(original.command, self.config)
        except KeyError:
            await self.refuse(req, asked, original, f"`{original.command}` is no longer a command in opsbot's config, so opsbot "
                                                    f"cannot say how to undo `{original.id}`; do it by hand.", why="no_command")
            return None
        inverse = cmd.inverse(original.plan, original.result or {})
        if inverse.text is None:
            await self.refuse(req, asked, original, f"`{original.id}` ({mrkdwn(original.summary)}) cannot be undone: "
                                                    f"{inverse.why}. Nothing was requested.", why="no_inverse")
            return None
        already = await self.store.undo_of(original.id)
        if already is not None:
            await self.refuse(req, asked, original, f"`{original.id}` is being undone already, or was, by `{already}`; "
                                                    "nothing more was requested.", why="duplicate", undo=already)
            return None
        try:
            inv = parse(inverse.text, self.config)
        except UserError as exc:  # the config changed since (a range, a value word): the grammar decides
            await self.refuse(req, asked, original, f"`{original.id}` cannot be undone as {code('/ops ' + inverse.text)}: "
                                                    f"{exc} Nothing was requested.", why="inverse_invalid")
            return None
        reason = asked.flags.reason or f"undo of {original.id}"
        inv = replace(inv, flags=Flags(reason=reason, dry_run=asked.flags.dry_run))
        return UndoStart(original=original, command=cmd, invocation=inv, asked=asked)

    async def still_as_left(self, req: CommandRequest, start: UndoStart, plan: Plan) -> bool:
        """The stale check: the target is still as the original left it (else refused, saying what moved)."""
        moved = start.command.moved_on(start.original.plan, plan, start.original.id)
        if moved is None:
            return True
        await self.refuse(req, start.asked, start.original, f"{moved}; nothing was requested. Look at it and request what is "
                                                            "needed now.", why="stale", plan=plan)
        return False

    async def link(self, start: UndoStart) -> str | None:
        """The original card's permalink, for the new card (best effort: the card names the id anyway)."""
        original = start.original
        if not original.card_channel or not original.card_ts:
            return None
        try:
            return await self.chat.permalink(channel_id=original.card_channel, ts=original.card_ts)
        except OpsbotError as exc:
            log.warning("no permalink for the card of %s: %s", original.id, exc)
            return None

    async def opened(self, req: CommandRequest, start: UndoStart, new: OpsRequest) -> None:
        """The undo request is open: the original's trail says so, and the person is told."""
        await self.audit.record("undo_requested", actor=req.actor, channel_id=req.channel_id, request_id=start.original.id,
                                text=start.asked.text, plan=start.original.plan,
                                result={"undo": new.id, "as": start.invocation.text,
                                        "message": f"undo requested as `{new.id}`: /ops {start.invocation.text}"})
        where = new.card_channel or req.channel_id
        await self._reply(req, f":leftwards_arrow_with_hook: Undo of `{start.original.id}` requested as `{new.id}`: "
                               f"{mrkdwn(new.summary)} ({code('/ops ' + start.invocation.text)}). Its card is in <#{where}>.")

    async def refuse(self, req: CommandRequest, asked: Invocation, original: OpsRequest | None, message: str, *, why: str,
                     undo: str | None = None, plan: Plan | None = None, backend: str | None = None, reply: bool = True) -> None:
        """An undo that ends here: recorded on the original's trail (``undo_refused``) and, unless
        the person was already answered (``reply=False``: a policy refusal said so itself), told why."""
        await self.audit.record("undo_refused", actor=req.actor, channel_id=req.channel_id,
                                request_id=original.id if original else None, text=asked.text,
                                plan=plan.to_json() if plan is not None else (original.plan if original else None),
                                result={"why": why, "message": message, "request_id_given": str(asked.params["request_id"]),
                                        **({"undo": undo} if undo else {}), **({"backend": backend} if backend else {})})
        if reply:
            await self._reply(req, f":x: Not undone: {message}")

    async def _reply(self, req: CommandRequest, text: str) -> None:
        await tell(self.chat.respond(response_url=req.response_url, channel_id=req.channel_id, user_id=req.actor.user_id,
                                     text=text))


def undo_text(request_id: str) -> str:
    """The `/ops` text an Undo click stands for (the value is whatever the client sent: quoted, so it
    stays one word and the grammar refuses it if it is not an id)."""
    return "undo " + shlex.quote(request_id[:200])
