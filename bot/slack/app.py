"""The Slack edge: a slack-bolt AsyncApp with the `/ops` command and the card's buttons.

The ack never waits on Kubernetes, the databases or the queue. Parsing is pure (config lookups
only), so a usage error is the ack itself; everything else runs after the ack (Bolt keeps the
listener running once ``ack()`` has answered Slack's HTTP request, in its default
``process_before_response=False`` mode).

Every signed request gets an answer: the listeners ack first and guard everything after, so no
input (a malformed id, a NUL, a forged button, a bug) leaves Slack without a response or the
attempt without an audit row. Requests that are not signed, or are not Slack payloads at all, are
refused before Bolt sees them (``bot/runtime.py``, ``slack_events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.approvals import Approvals
from bot.domain import Actor, ChannelId, CommandRequest, Invocation, UserId
from bot.errors import BackendUnavailable, MalformedPayload, UserError
from bot.home import HOME_APPROVE, HOME_OPEN_CARD, Home
from bot.messages import busy_text
from bot.pipeline import Pipeline
from bot.ports import tell
from bot.slack.approvers import approver_listeners, read_click
from bot.slack.blocks import ACKNOWLEDGE, APPROVE, UNDO
from bot.slack.payloads import click, click_user, command_request, home_click, home_user, unchecked_request
from bot.undo import undo_text

log = logging.getLogger(__name__)
T = TypeVar("T")
INTERNAL = ":x: opsbot hit an internal error; nothing was changed. The error is in opsbot's logs."
SLOW_AFTER = 2.0  # seconds before a person still waiting is told why (a look is expected well within that)
SLOW_COMMAND = (":hourglass: Still working on it: a backend (the cluster, a database or a queue) is slow to answer, or opsbot "
                "is busy. Nothing is guessed or skipped; the answer, or the reason there is none, comes here.")
SLOW_CLICK = (":hourglass: Your click is being recorded, but opsbot's database is slow to answer. It counts once the database "
              "takes it; the card will show it. No need to click again.")


async def _telling_if_slow(work: Awaitable[T], say: Callable[[], Awaitable[None]], *, after: float = SLOW_AFTER) -> T:
    """Run ``work``; if it is still running after ``after`` seconds, ``say`` so once and go on
    waiting. A backend that is frozen (SIGSTOP, a black-holed network) holds the request until it
    answers or its connection breaks: the person is told rather than left guessing, and the request
    is neither dropped half-way nor answered with a guess."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=after)
    if not done:
        await tell(say())
    return await task


async def _admitted(pipeline: Pipeline, req: CommandRequest, inv: Invocation, private: Callable[[str], Awaitable[None]]) -> str | None:
    """A command a click asks for (Undo, Request again): unlike a vote it is a new request (it
    plans), so it is admitted like a typed command. Past the bound the clicker is told privately
    that opsbot is busy and the attempt is audited ``busy`` (returns None); otherwise what
    ``Pipeline.handle`` returns (the id of the request this delivery opened already, if it had)."""
    load = pipeline.admission.enter()
    if load is not None:
        await tell(private(busy_text(load.in_flight, load.retry_after)))
        pipeline.record_busy(req, inv, load)
        return None
    try:
        return await _telling_if_slow(pipeline.handle(req, inv), lambda: private(SLOW_COMMAND))
    finally:
        pipeline.admission.leave()


@contextlib.contextmanager
def _tracked(inflight: set[asyncio.Task[Any]]) -> Iterator[None]:
    """Listeners keep running after the ack; shutdown waits for them (Runtime.stop) so that no
    audit row or reply is cut off half-way."""
    task = asyncio.current_task()
    if task is not None:
        inflight.add(task)
    try:
        yield
    finally:
        if task is not None:
            inflight.discard(task)


def single_workspace(client: AsyncWebClient) -> Callable[..., Awaitable[AuthorizeResult]]:
    """Bolt's default single-workspace authorization calls ``auth.test`` on the first request and,
    when Slack's Web API is down at that moment, refuses every request ("Please install this app
    into the workspace") until it answers. Slash commands and clicks come through Slack's edge even
    while the Web API is failing, and opsbot must still record them and answer through their
    ``response_url``. So: ``auth.test`` is asked until it answers once, and meanwhile the request
    goes on with the bot token alone."""
    known: list[AsyncSlackResponse] = []

    async def authorize(enterprise_id: str | None, team_id: str | None, user_id: str | None) -> AuthorizeResult:
        if not known:
            try:
                known.append(await client.auth_test())
            except Exception as exc:  # any failure: go on without the bot's own ids
                log.warning("auth.test failed (%s); handling the request with the bot token alone", exc)
                return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id, bot_token=client.token, user_id=user_id)
        return AuthorizeResult.from_auth_test_response(bot_token=client.token, auth_test_response=known[0])

    return authorize


def build_app(*, client: AsyncWebClient, signing_secret: str, pipeline: Pipeline, approvals: Approvals,
              inflight: set[asyncio.Task[Any]]) -> AsyncApp:
    app = AsyncApp(client=client, signing_secret=signing_secret, process_before_response=False,
                   ignoring_self_events_enabled=True, authorize=single_workspace(client),
                   logger=logging.getLogger("slack_bolt.AsyncApp"))

    @app.command("/ops")
    async def ops(ack: Any, body: dict[str, Any]) -> None:
        with _tracked(inflight):
            await _ops(ack, body)

    async def _ops(ack: Any, body: dict[str, Any]) -> None:
        try:
            req = command_request(body)
        except MalformedPayload as exc:
            await ack(text=f":x: {exc}")
            await pipeline.record_refused_payload(unchecked_request(body), exc)
            return
        inv: Invocation | None = None
        try:
            inv = pipeline.parse(req)
        except UserError as exc:
            await ack(text=f":x: {exc}")
            await pipeline.record_invalid(req, exc)
            return
        except Exception:
            log.exception("parsing %r failed", req.text[:200])
            await ack(text=INTERNAL)
            await pipeline.record_invalid(req, UserError("internal error while reading the command"))
            return
        # Admission: past the bound the command is answered in its ack that opsbot is busy (and
        # audited) rather than queued behind work that cannot finish in time (bot/pipeline.py).
        load = pipeline.admission.enter()
        if load is not None:
            await ack(text=busy_text(load.in_flight, load.retry_after))
            pipeline.record_busy(req, inv, load)
            return
        await ack()
        try:
            await _telling_if_slow(pipeline.handle(req, inv),
                                   lambda: approvals.chat.respond(response_url=req.response_url, channel_id=req.channel_id,
                                                                  user_id=req.actor.user_id, text=SLOW_COMMAND))
        finally:
            pipeline.admission.leave()

    @app.action(APPROVE)
    async def vote(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with _tracked(inflight):
            if (c := await read_click(ack, body, action, _malformed_click, click)) is None:
                return
            try:
                await _telling_if_slow(
                    approvals.click(c.value, c.actor, "approve", channel_id=c.channel_id, message_ts=c.message_ts),
                    lambda: approvals.chat.post_ephemeral(channel_id=c.channel_id, user_id=c.actor.user_id, text=SLOW_CLICK))
            except BackendUnavailable as exc:  # fail closed, and say so: the vote lives in PostgreSQL
                note = await pipeline.record_click_unavailable(c.actor, c.channel_id, c.value, exc)
                await tell(approvals.chat.post_ephemeral(
                    channel_id=c.channel_id, user_id=c.actor.user_id,
                    text=f":x: Your click was not counted: {exc}. Nothing changed; click again when it is back.{note}"))
            except Exception:
                log.exception("a click on %r failed", c.value[:80])
                await tell(approvals.chat.post_ephemeral(channel_id=c.channel_id, user_id=c.actor.user_id,
                                                         text=f"{INTERNAL} Your click was not counted."))

    @app.action(ACKNOWLEDGE)
    async def acknowledge(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with _tracked(inflight):
            if (c := await read_click(ack, body, action, _malformed_click, click)) is None:
                return
            try:
                await approvals.acknowledge(c.value, c.actor, channel_id=c.channel_id, message_ts=c.message_ts)
            except BackendUnavailable as exc:
                note = await pipeline.record_click_unavailable(c.actor, c.channel_id, c.value, exc)
                await tell(approvals.chat.post_ephemeral(
                    channel_id=c.channel_id, user_id=c.actor.user_id,
                    text=f":x: Your review was not recorded: {exc}. Click again when it is back.{note}"))
            except Exception:
                log.exception("a review click on %r failed", c.value[:80])
                await tell(approvals.chat.post_ephemeral(channel_id=c.channel_id, user_id=c.actor.user_id,
                                                         text=f"{INTERNAL} Your review was not recorded."))

    @app.action(UNDO)
    async def undo(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Undo on a succeeded card: `/ops undo <id>` typed by the clicker, in the card's channel;
        they are answered privately (no response_url: an ephemeral message), the new card is posted."""
        with _tracked(inflight):
            if (c := await read_click(ack, body, action, _malformed_click, click)) is None:
                return
            req = CommandRequest(actor=c.actor, channel_id=ChannelId(c.channel_id), text=undo_text(c.value))

            def private(text: str) -> Awaitable[None]:
                return approvals.chat.post_ephemeral(channel_id=c.channel_id, user_id=c.actor.user_id, text=text)
            try:
                inv = pipeline.parse(req)
            except UserError as exc:
                await tell(private(f":x: {exc}"))
                await pipeline.record_invalid(req, exc)
                return
            await _admitted(pipeline, req, inv, private)

    approver_listeners(app, pipeline=pipeline, approvals=approvals, tracked=lambda: _tracked(inflight),
                       malformed=lambda body, exc: _malformed_click(body, exc),
                       admitted=lambda req, inv, private: _admitted(pipeline, req, inv, private))

    # The Home tab (bot/home.py, issue 14). Registered before the catch-all below: Bolt runs the first listener that matches.
    home = Home(config=approvals.config, store=approvals.store, audit=approvals.audit, chat=approvals.chat, approvals=approvals)

    @app.event("app_home_opened")
    async def home_opened(event: dict[str, Any]) -> None:
        with _tracked(inflight):
            user = home_user(event)
            if user is None:  # the Messages or About tab, or not a user
                return
            try:
                await home.opened(Actor(UserId(user)))
            except Exception:
                log.exception("the Home tab of %s failed", user)

    @app.action(HOME_APPROVE)
    async def home_approve(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with _tracked(inflight):
            if (c := await read_click(ack, body, action, _malformed_click, home_click)) is None:
                return
            try:
                await home.approve(c.actor, request_id=c.value, view_id=c.view_id, view_type=c.view_type)
            except Exception:
                log.exception("a Home tab click on %r failed", c.value[:80])

    @app.action(HOME_OPEN_CARD)
    async def home_open_card(ack: Any) -> None:  # a link button: Slack opens the card; the click is only acked
        await ack()

    @app.action(re.compile(".*"))
    async def other_button(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        """A button opsbot never made (an old app version's, or a forged one): say so, record it."""
        with _tracked(inflight):
            await ack()
            await _malformed_click(body, MalformedPayload(f"opsbot has no button `{str(action.get('action_id'))[:60]}`; "
                                                          "nothing was done."))

    async def _malformed_click(body: dict[str, Any], exc: MalformedPayload) -> None:
        user, channel = click_user(body)
        await pipeline.record_refused_click(Actor(UserId(user or "unknown")), channel, exc)
        if user and channel:
            await tell(approvals.chat.post_ephemeral(channel_id=channel, user_id=user, text=f":x: {exc}"))

    return app
