"""``Chat`` through the Slack Web API (slack_sdk's AsyncWebClient; its base_url is SLACK_API_URL).

Every Slack failure becomes an ``ExecutionError`` that says what could not be done and, for the
common causes, what to do about it; a timeout after the request was sent is ``DeliveryUncertain``
(the message may have arrived), so the outboxes can look before posting again.

Rate limits: when Slack answers 429, its ``Retry-After`` is honoured per Web API method: until it
has passed, calls to that method fail at once with ``RateLimited`` (carrying the seconds left)
without reaching Slack, and the outboxes schedule their next attempt after it. slack_sdk's own
rate-limit retry handler is not installed, so nothing sleeps inside a listener.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.domain import OpsRequest
from bot.errors import DeliveryUncertain, ExecutionError, RateLimited
from bot.slack.blocks import card_blocks, card_fallback, message_with_undo

T = TypeVar("T")
REPLY_TIMEOUT = 30.0  # seconds for one reply through a response_url (slack_sdk's own default)

_HINTS = {
    "not_in_channel": "invite the opsbot app to this channel (`/invite @opsbot`)",
    "channel_not_found": "the channel is unknown to the opsbot app; invite it, or check slack.audit_channel",
    "invalid_auth": "SLACK_BOT_TOKEN is not valid",
    "missing_scope": "the Slack app lacks a scope; reinstall it from manifests/slack-app.yaml",
}


def _retry_after(headers: Any) -> float:
    for key, value in dict(headers or {}).items():
        if str(key).lower() == "retry-after":
            try:
                return max(1.0, min(float(value if not isinstance(value, list) else value[0]), 3600.0))
            except (TypeError, ValueError):
                break
    return 30.0  # Slack always sends it; if it did not, do not hammer it


async def _slack(what: str, call: Awaitable[T]) -> T:
    try:
        return await call
    except SlackApiError as exc:
        if exc.response.status_code == 429:
            raise RateLimited(f"Slack is rate-limiting opsbot ({what})", retry_after=_retry_after(exc.response.headers)) from exc
        code = str(exc.response.get("error", "error")) if isinstance(exc.response.data, dict) else f"HTTP {exc.response.status_code}"
        hint = _HINTS.get(code)
        raise ExecutionError(f"Slack refused to {what}: {code}" + (f" ({hint})" if hint else ""),
                             temporary=code == "ratelimited" or code.startswith("HTTP 5")) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise DeliveryUncertain(f"Slack did not answer in time to {what} ({type(exc).__name__}); it may have arrived") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ExecutionError(f"Slack is unreachable ({what}): {type(exc).__name__}: {exc}", temporary=True) from exc


class SlackChat:
    def __init__(self, client: AsyncWebClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self._clock = clock
        self._blocked_until: dict[str, float] = {}  # Web API method → when its Retry-After has passed
        self._me: tuple[str, str] | None = None  # (user id, bot id) from auth.test, asked once
        # One HTTP session for every reply through a response_url (made on first use, inside the
        # event loop): its connections are kept and reused, instead of a new session and TCP (and
        # TLS) connection per reply. slack_sdk's connection-error retry (once) covers a kept
        # connection that Slack closed meanwhile.
        self._replies: aiohttp.ClientSession | None = None

    def _reply_session(self) -> aiohttp.ClientSession:
        if self._replies is None or self._replies.closed:
            # limit=0: no cap on connections at once (a session per reply had none either); a burst of
            # replies must not queue behind one another for a connection.
            self._replies = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REPLY_TIMEOUT),
                                                  connector=aiohttp.TCPConnector(limit=0))
        return self._replies

    def open(self) -> None:
        """Give the Web API client one HTTP session of its own (inside the event loop, at start): its
        connections are kept and reused. Without one, slack_sdk makes a session and a TCP (and TLS)
        connection for every call and closes it after, and each command makes several calls (the
        card, the audit channel's posts): under load that was a tenth of the process's CPU, and as
        much again on the other end. slack_sdk's connection-error retry (once) covers a kept
        connection that Slack closed while it was idle; the timeout is the client's, as before."""
        if self.client.session is None or self.client.session.closed:
            self.client.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.client.timeout),
                                                        connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self._replies is not None and not self._replies.closed:
            await self._replies.close()
        self._replies = None
        session, self.client.session = self.client.session, None
        if session is not None and not session.closed:
            await session.close()

    async def _call(self, method: str, what: str, call: Callable[[], Awaitable[T]]) -> T:
        left = self._blocked_until.get(method, 0.0) - self._clock()
        if left > 0:
            raise RateLimited(f"Slack is rate-limiting opsbot ({what}); waiting {left:.0f} s as it asked", retry_after=left)
        try:
            # The client's timeout, whatever the session's (a kept session has its own, set at ``open``)
            async with asyncio.timeout(self.client.timeout):
                return await _slack(what, call())
        except TimeoutError as exc:
            raise DeliveryUncertain(f"Slack did not answer in time to {what} (TimeoutError); it may have arrived") from exc
        except RateLimited as exc:
            self._blocked_until[method] = self._clock() + exc.retry_after
            raise

    async def respond(self, *, response_url: str, channel_id: str, user_id: str, text: str, public: bool = False) -> None:
        if response_url:
            resp = await self._call("response_url", "reply", lambda: AsyncWebhookClient(response_url, session=self._reply_session()).send(
                text=text, response_type="in_channel" if public else "ephemeral"))
            if resp.status_code < 300:
                return
        if public:
            await self._call("chat.postMessage", "reply", lambda: self.client.chat_postMessage(channel=channel_id, text=text))
        else:
            await self._call("chat.postEphemeral", "answer you privately",
                             lambda: self.client.chat_postEphemeral(channel=channel_id, user=user_id, text=text))

    async def post_card(self, request: OpsRequest) -> tuple[str, str]:
        resp = await self._call("chat.postMessage", "post the approval card", lambda: self.client.chat_postMessage(
            channel=request.channel_id, text=card_fallback(request), blocks=card_blocks(request)))
        return str(resp["channel"]), str(resp["ts"])

    async def update_card(self, request: OpsRequest) -> None:
        if not (request.card_channel and request.card_ts):
            return
        channel, ts = request.card_channel, request.card_ts
        await self._call("chat.update", "update the approval card", lambda: self.client.chat_update(
            channel=channel, ts=ts, text=card_fallback(request), blocks=card_blocks(request)))

    async def post_in_thread(self, request: OpsRequest, text: str) -> None:
        await self._call("chat.postMessage", "reply in the request's thread", lambda: self.client.chat_postMessage(
            channel=request.card_channel or request.channel_id, thread_ts=request.card_ts, text=text))

    async def post_ephemeral(self, *, channel_id: str, user_id: str, text: str) -> None:
        await self._call("chat.postEphemeral", "answer you privately",
                         lambda: self.client.chat_postEphemeral(channel=channel_id, user=user_id, text=text))

    async def post_message(self, *, channel_id: str, text: str, thread_ts: str | None = None, undo: str | None = None) -> str:
        blocks = message_with_undo(text, undo) if undo else None
        resp = await self._call("chat.postMessage", "post a message", lambda: self.client.chat_postMessage(
            channel=channel_id, text=text, thread_ts=thread_ts, unfurl_links=False, unfurl_media=False, blocks=blocks))
        return str(resp["ts"])

    async def update_message(self, *, channel_id: str, ts: str, text: str) -> None:
        await self._call("chat.update", "update the audit headline", lambda: self.client.chat_update(channel=channel_id, ts=ts, text=text))

    async def permalink(self, *, channel_id: str, ts: str) -> str | None:
        try:
            resp = await self._call("chat.getPermalink", "link a message",
                                    lambda: self.client.chat_getPermalink(channel=channel_id, message_ts=ts))
        except ExecutionError:
            return None  # a link is a convenience; the record does not depend on it
        return str(resp.get("permalink") or "") or None

    async def open_view(self, *, trigger_id: str, view: dict[str, Any]) -> None:
        await self._call("views.open", "open the dialog", lambda: self.client.views_open(trigger_id=trigger_id, view=view))

    async def find_message(self, *, channel_id: str, needle: str, thread_ts: str | None = None) -> str | None:
        resp: Any
        if thread_ts:
            resp = await self._call("conversations.replies", "read a thread",
                                    lambda: self.client.conversations_replies(channel=channel_id, ts=thread_ts, limit=200))
        else:
            resp = await self._call("conversations.history", "read the audit channel",
                                    lambda: self.client.conversations_history(channel=channel_id, limit=200))
        user_id, bot_id = await self._identity()
        for message in resp.get("messages") or []:
            # Only opsbot's own posts: anyone in the channel could post the needle (a row hash, a
            # reply's text) to make opsbot believe its post arrived and never send the real one.
            mine = (user_id and message.get("user") == user_id) or (bot_id and message.get("bot_id") == bot_id)
            if mine and needle in str(message.get("text", "")):
                return str(message["ts"])
        return None

    async def _identity(self) -> tuple[str, str]:
        if self._me is None:
            resp: Any = await self._call("auth.test", "ask Slack who opsbot is", lambda: self.client.auth_test())
            self._me = (str(resp.get("user_id") or ""), str(resp.get("bot_id") or ""))
        return self._me

    # ------------------------------------------------------------------ the incident timeline and the Home tab (issue 14)

    async def upload_file(self, *, channel_id: str, thread_ts: str, filename: str, title: str, content: str) -> None:
        """A file in a message's thread. slack_sdk's ``files_upload_v2`` makes the three calls Slack
        wants (files.getUploadURLExternal, a POST of the bytes to the URL it gave, then
        files.completeUploadExternal); the old files.upload is retired."""
        try:
            await self._call("files.upload", "attach the file", lambda: self.client.files_upload_v2(
                channel=channel_id, thread_ts=thread_ts, filename=filename, title=title, content=content))
        except SlackRequestError as exc:  # the POST of the bytes to the upload URL failed
            raise ExecutionError(f"Slack refused to attach the file: {exc}", temporary=True) from exc

    async def open_dm(self, *, user_id: str) -> str:
        """The id (``D…``) of ``user_id``'s direct message with opsbot (conversations.open): a file can
        be shared only in a conversation, not to a user id as chat.postMessage takes."""
        resp: Any = await self._call("conversations.open", "open your direct message with opsbot",
                                     lambda: self.client.conversations_open(users=user_id))
        channel = str((resp.get("channel") or {}).get("id") or "")
        if not channel:
            raise ExecutionError("Slack did not say which direct message to use (conversations.open answered no channel id)")
        return channel

    async def publish_home(self, *, user_id: str, view: dict[str, Any]) -> str:
        resp: Any = await self._call("views.publish", "show your Home tab",
                                     lambda: self.client.views_publish(user_id=user_id, view=view))
        return str((resp.get("view") or {}).get("id") or "")

    async def channel_members(self, channel_id: str, *, limit: int) -> set[str]:
        try:
            return await self._members(channel_id, limit=limit)
        except ExecutionError as exc:
            if "channel_not_found" in str(exc) or "not_in_channel" in str(exc):
                return set()  # a channel opsbot cannot see: nobody is shown its actions
            raise

    async def _members(self, channel_id: str, *, limit: int) -> set[str]:
        members: set[str] = set()
        cursor: str | None = None
        while len(members) < limit:
            resp: Any = await self._call("conversations.members", "see who is in a channel",
                                         lambda c=cursor: self.client.conversations_members(  # type: ignore[misc]
                                             channel=channel_id, limit=min(200, limit), cursor=c))
            members.update(str(m) for m in resp.get("members") or [])
            cursor = str((resp.get("response_metadata") or {}).get("next_cursor") or "") or None
            if not cursor:
                break
        return members
