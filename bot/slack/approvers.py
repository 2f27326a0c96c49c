"""The card's buttons for approvers and requesters beyond Approve: Deny (with a reason, in a dialog),
Cancel (the requester's), Request again (on a denied, expired or stale card).

* **Deny** opens a dialog (``views.open`` with the click's ``trigger_id``) asking why; its
  submission counts the deny with the reason (on the card, in the thread, in the audit row). The
  submission is checked like a click: the dialog's metadata must name an opsbot request and its
  card, it must be the submitter's own dialog, and the vote then goes through the same checks as any
  click (eligible, not closed, not twice). When the dialog cannot be opened (Slack's Web API down,
  the trigger expired after 3 s), the deny still counts, with "no reason given (the dialog could not
  be opened)": denying is the safe direction, and an approver must be able to stop a request
  during an outage. A reason is refused (the dialog says why) when it is empty, over
  ``DENY_REASON_MAX`` characters or holds control characters; mentions and links are shown inert.
* **Cancel** is the requester's: anyone else is told privately that only the requester can cancel.
* **Request again** re-runs the same command text as a new request by the clicker, through the
  pipeline's normal path (plan → policy → approval). It is refused when the text no longer parses
  (the config changed). One re-request per card and person: a second click is the same delivery
  (``again.<card's request>.<clicker>``), and the clicker is told privately which request it opened
  (audited ``again_refused``, why ``duplicate``). Like Undo, it is a new request, so it goes through
  the admission bound (busy → told so, audited ``busy``). ``requested_again`` is recorded only when
  a request was opened.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from slack_bolt.async_app import AsyncApp

from bot.approvals import Approvals
from bot.domain import REQUEST_ID_PATTERN, Actor, ChannelId, CommandRequest, Invocation, OpsRequest, UserId
from bot.errors import BackendUnavailable, MalformedPayload, OpsbotError, UserError
from bot.messages import code
from bot.pipeline import Pipeline
from bot.ports import tell
from bot.slack.blocks import AGAIN, AGAIN_STATES, CANCEL, DENY, DENY_REASON_MAX, DENY_VIEW, deny_view
from bot.slack.payloads import Click, HomeClick, click, click_user, deny_submission
from bot.untrusted import check_free_text, storable

log = logging.getLogger(__name__)
NO_DIALOG = "no reason given (the dialog could not be opened)"
INTERNAL = ":x: opsbot hit an internal error; nothing was changed. The error is in opsbot's logs."
C = TypeVar("C", Click, HomeClick)


async def read_click(ack: Any, body: dict[str, Any], action: dict[str, Any],
                     malformed: Callable[[dict[str, Any], MalformedPayload], Awaitable[None]],
                     parse: Callable[[dict[str, Any], dict[str, Any]], C]) -> C | None:
    """Every button listener's first step: ack the click, then read it with ``parse``. A malformed
    click (a forged value, a payload of the wrong shape) is answered and recorded by ``malformed``
    and gives None, so the listener returns without acting."""
    await ack()
    try:
        return parse(body, action)
    except MalformedPayload as exc:
        await malformed(body, exc)
        return None


def request_click(body: dict[str, Any], action: dict[str, Any]) -> Click:
    """A click whose value must be an opsbot request id."""
    c = click(body, action)
    if not re.fullmatch(REQUEST_ID_PATTERN, c.value):
        raise MalformedPayload("this button does not name an opsbot request; nothing was done.")
    return c


def approver_listeners(app: AsyncApp, *, pipeline: Pipeline, approvals: Approvals,
                       tracked: Callable[[], contextlib.AbstractContextManager[None]],
                       malformed: Callable[[dict[str, Any], MalformedPayload], Awaitable[None]],
                       admitted: Callable[[CommandRequest, Invocation, Callable[[str], Awaitable[None]]],
                                          Awaitable[str | None]]) -> None:
    async def private(c: Click | Actor, channel_id: str, text: str) -> None:
        user = c.actor.user_id if isinstance(c, Click) else c.user_id
        await tell(approvals.chat.post_ephemeral(channel_id=channel_id, user_id=user, text=text))

    async def guarded(c: Click, what: str, work: Awaitable[None]) -> None:
        try:
            await work
        except BackendUnavailable as exc:
            note = await pipeline.record_click_unavailable(c.actor, c.channel_id, c.value, exc)
            await private(c, c.channel_id, f":x: Not done: {exc}. Nothing changed; click again when it is back.{note}")
        except Exception:
            log.exception("%s on %r failed", what, c.value[:80])
            await private(c, c.channel_id, INTERNAL)

    async def deny_vote(c: Click, reason: str | None) -> None:
        await approvals.click(c.value, c.actor, "deny", channel_id=c.channel_id, message_ts=c.message_ts, reason=reason)

    @app.action(DENY)
    async def deny(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with tracked():
            if (c := await read_click(ack, body, action, malformed, click)) is None:
                return

            async def work() -> None:
                problem = await approvals.deny_problem(c.value, c.actor, channel_id=c.channel_id, message_ts=c.message_ts)
                request = None if problem else await approvals.store.get(c.value)
                if request is None:  # the vote refuses it, tells the clicker why and records it
                    await deny_vote(c, None)
                    return
                trigger = body.get("trigger_id")
                try:
                    if not isinstance(trigger, str) or not trigger:
                        raise OpsbotError("the click carried no trigger_id")
                    await approvals.chat.open_view(trigger_id=trigger, view=deny_view(
                        request, channel_id=c.channel_id, message_ts=c.message_ts, user_id=c.actor.user_id))
                except OpsbotError as exc:
                    log.warning("the Deny dialog for %s could not be opened (%s); the deny counts without a reason", c.value, exc)
                    await deny_vote(c, NO_DIALOG)

            await guarded(c, "a Deny click", work())

    @app.view(DENY_VIEW)
    async def deny_submitted(ack: Any, body: dict[str, Any]) -> None:
        with tracked():
            try:
                sub = deny_submission(body)
            except MalformedPayload as exc:
                await ack(response_action="errors", errors={"reason": str(exc)[:150]})
                user, _ = click_user(body)
                await pipeline.record_refused_click(Actor(UserId(user or "unknown")), "", exc)
                return
            problem = check_free_text(sub.reason, what="The reason", limit=DENY_REASON_MAX)
            if problem:
                await ack(response_action="errors", errors={"reason": problem[:150]})
                await approvals.audit.record("vote_refused", actor=sub.actor, channel_id=sub.channel_id, request_id=None,
                                             result={"decision": "deny", "why": "reason_refused", "message": problem,
                                                     "request_id_given": sub.request_id, "reason": storable(sub.reason, 600)})
                return
            await ack()
            c = Click(actor=sub.actor, channel_id=sub.channel_id, message_ts=sub.message_ts, value=sub.request_id)
            await guarded(c, "a Deny dialog", deny_vote(c, sub.reason.strip()))

    @app.action(CANCEL)
    async def cancel(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with tracked():
            if (c := await read_click(ack, body, action, malformed, request_click)) is None:
                return

            async def work() -> None:
                await private(c, c.channel_id, await approvals.cancel(c.value, c.actor, channel_id=c.channel_id))

            await guarded(c, "a Cancel click", work())

    @app.action(AGAIN)
    async def again(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with tracked():
            if (c := await read_click(ack, body, action, malformed, click)) is None:
                return
            await guarded(c, "a Request again click", request_again(c))

    async def request_again(c: Click) -> None:
        request = await approvals.store.get(c.value) if re.fullmatch(REQUEST_ID_PATTERN, c.value) else None
        why = ""
        if request is None or (request.card_channel, request.card_ts) != (c.channel_id, c.message_ts):
            why = "this button does not belong to an opsbot request's card; nothing was requested."
        elif request.state not in AGAIN_STATES:
            why = (f"`{request.id}` is {request.state.value.replace('_', ' ')}; only a denied, expired or stale request "
                   "can be requested again.")
        if why:
            await approvals.audit.record("again_refused", actor=c.actor, channel_id=c.channel_id,
                                         request_id=request.id if request and not why.startswith("this button") else None,
                                         result={"why": why, "request_id_given": storable(c.value, 64)})
            await private(c, c.channel_id, f":x: {why}")
            return
        assert request is not None
        # An undo asked again is an undo again (bot/undo.py): linked to its original and checked for staleness.
        text = f"undo {request.undo_of}" if request.undo_of else request.text
        req = CommandRequest(actor=c.actor, channel_id=ChannelId(c.channel_id), text=text,
                             delivery_id=f"again.{request.id}.{c.actor.user_id}")
        first = await approvals.store.by_delivery(req.delivery_id)
        if first is not None:  # this person asked again from this card already
            await duplicate(c, request, first.id, first)
            return
        try:
            inv = pipeline.parse(req)
        except UserError as exc:
            await pipeline.record_invalid(req, exc)
            await private(c, c.channel_id, f":x: {code('/ops ' + text)} no longer reads as a command ({exc}); "
                                           "nothing was requested. Type the command again as it is now.")
            return

        def say(message: str) -> Awaitable[None]:
            return approvals.chat.post_ephemeral(channel_id=c.channel_id, user_id=c.actor.user_id, text=message)
        earlier = await admitted(req, inv, say)
        if earlier is not None:  # two clicks at once: the other one opened it
            await duplicate(c, request, earlier, await approvals.store.by_delivery(req.delivery_id))
            return
        opened = await approvals.store.by_delivery(req.delivery_id)
        if opened is not None:  # not when busy, refused by policy or limits (each audited as such)
            await approvals.audit.record("requested_again", actor=c.actor, channel_id=c.channel_id, request_id=request.id,
                                         text=request.text, result={"again_of": request.id, "opened": opened.id})

    async def duplicate(c: Click, request: OpsRequest, first_id: str, first: OpsRequest | None) -> None:
        link = None
        if first is not None and first.card_channel and first.card_ts:
            link = await approvals.permalinks.get(first.card_channel, first.card_ts)
        why = f"already requested again as `{first_id}`" + (f" (<{link}|its card>)" if link else "")
        await approvals.audit.record("again_refused", actor=c.actor, channel_id=c.channel_id, request_id=request.id,
                                     result={"why": "duplicate", "message": why, "again_as": first_id, "link": link})
        await private(c, c.channel_id, f":information_source: You {why}; nothing new was requested.")
