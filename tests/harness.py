"""An in-process opsbot that tests (and people) can talk to like Slack does.

``Harness.slash(user, "/ops scale worker 6")`` sends a correctly signed slash-command request over
HTTP to the running app; ``harness.click(user, request_id, "approve")`` sends a signed
``block_actions`` payload, as Slack would when a person clicks the button. What the bot says
lands in the fake Slack (``harness.slack``); what it does lands in the Kubernetes emulator, the
platform database and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from bot.config import Config
from bot.domain import OpsRequest
from bot.runtime import Runtime
from bot.sandbox.slack_api import FakeSlack
from bot.settings import Settings

SIGNING_SECRET = "test-signing-secret"
# How each final state's notice in the card's thread begins (bot/messages.py, bot/approvals.py).
_THREAD_MARK = {"succeeded": ":large_green_circle:", "failed": ":red_circle:", "stale": ":warning:",
                "unknown": ":grey_question:", "denied": ":no_entry:", "expired": ":alarm_clock:", "cancelled": ":heavy_multiplication_x:"}
T = TypeVar("T")


class Harness:
    INCIDENT = "C0INCIDENT"

    def __init__(self, *, runtime: Runtime, slack: FakeSlack) -> None:
        self.runtime, self.slack = runtime, slack
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.verifier = SignatureVerifier(SIGNING_SECRET)
        self._responses_before = 0
        self._last_before: str | None = None
        self._made_spool: str | None = None  # the spool directory start() made (a test's own is left alone)

    @classmethod
    async def start(cls, *, config: Config, slack: FakeSlack, database_url: str, redis_url: str, kubeconfig: str,
                    queue_prefix: str, with_worker: bool = True, spool_dir: str | None = None) -> Harness:
        settings = Settings(
            slack_bot_token="xoxb-test-token", slack_signing_secret=SIGNING_SECRET, slack_app_token=None,
            slack_api_url=slack.api_url, database_url=database_url, redis_url=redis_url, config_path="<test>",
            kubeconfig=kubeconfig, host="127.0.0.1", port=0, worker_id="test-worker", queue_prefix=queue_prefix,
            spool_dir=spool_dir or tempfile.mkdtemp(prefix="opsbot-spool-"),
        )
        made_spool = None if spool_dir else settings.spool_dir  # removed by stop()
        runtime = Runtime.build(settings, config)
        runtime.worker.sweep_every = 0.3
        runtime.poster.interval = 0.2
        runtime.notices.interval = 0.2
        h = cls(runtime=runtime, slack=slack)
        h._made_spool = made_spool
        await runtime.start(with_worker=with_worker)
        h._runner = web.AppRunner(runtime.web_app())
        await h._runner.setup()
        site = web.TCPSite(h._runner, "127.0.0.1", 0)
        await site.start()
        h.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        h._http = aiohttp.ClientSession()
        return h

    async def stop(self) -> None:
        if self._http:
            await self._http.close()
        if self._runner:
            await self._runner.cleanup()
        try:
            await self.runtime.stop()
        finally:
            if self._made_spool:
                shutil.rmtree(self._made_spool, ignore_errors=True)
                self._made_spool = None

    # ------------------------------------------------------------------ talking like Slack

    async def post_signed(self, body: str, content_type: str = "application/x-www-form-urlencoded",
                          *, signature: str | None = None, timestamp: int | None = None,
                          extra_headers: dict[str, str] | None = None) -> tuple[int, str]:
        assert self._http is not None
        ts = str(timestamp or int(time.time()))
        headers = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": signature or self.verifier.generate_signature(timestamp=ts, body=body),
            **(extra_headers or {}),
        }
        async with self._http.post(self.url + "/slack/events", data=body.encode(), headers=headers) as resp:
            return resp.status, await resp.text()

    async def slash(self, user: str, text: str, *, channel: str = INCIDENT) -> tuple[int, str]:
        """What Slack sends for ``/ops <text>``. Returns the HTTP status and the ack's body."""
        if text.startswith("/ops"):
            text = text[len("/ops"):].strip()
        self._responses_before = len(self.slack.responses)  # response() reads only what answers this command
        self._last_before = None  # requested() waits for a request newer than this one
        with contextlib.suppress(Exception):  # (a test may have taken opsbot's database down on purpose)
            last = await asyncio.wait_for(self.last_request(), timeout=2)
            self._last_before = last.id if last is not None else None
        return await self.post_signed(slash_body(self.slack, user, text, channel=channel))

    async def click(self, user: str, request_id: str, decision: str = "approve", *, channel: str = INCIDENT,
                    on_card_of: str | None = None, value: str | None = None, card_ts: str | None = None) -> tuple[int, str]:
        """A click on a request's card: ``decision`` is approve, deny or acknowledge. ``on_card_of``
        clicks on another request's card (a forged button); ``value`` overrides the button's value;
        ``card_ts`` names the card without asking opsbot's database (for tests that take it down)."""
        if card_ts is None:
            request = await self.runtime.store.get(on_card_of or request_id)
            card_ts = request.card_ts if request and request.card_ts else None
        views, told = len(self.slack.views), len(self.slack.ephemeral_to(user))
        answer = await self.post_signed(click_body(self.slack, user, request_id, card_ts or "1700000000.000001", decision,
                                                   channel=channel, value=value))
        if decision == "deny":  # Deny opens a dialog asking why (bot/slack/approvers.py): submit it, as a person would
            await self.deny_reason(user, request_id, views_before=views, told_before=told)
        return answer

    async def deny_reason(self, user: str, request_id: str, *, views_before: int, told_before: int,
                          reason: str = "denied in a test", timeout: float = 5.0) -> tuple[int, str] | None:
        """Submit the Deny dialog opened for ``user`` since ``views_before``. None when there is none:
        the click was refused (the person was told privately) or counted without a dialog (Slack down)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            opened = [v for v in self.slack.views[views_before:] if v["open"] and v["view"].get("callback_id") == "opsbot_deny_reason"]
            if opened:
                self.slack.close_view(opened[0]["id"])
                return await self.post_signed(self.slack.view_submission_body(opened[0]["id"], user, {"reason": reason}))
            if len(self.slack.ephemeral_to(user)) > told_before:
                return None
            with contextlib.suppress(Exception):  # (opsbot's database may be down on purpose)
                r = await asyncio.wait_for(self.runtime.store.get(request_id), timeout=0.5)
                if r is not None and r.state.value != "pending_approval":
                    return None
            await asyncio.sleep(0.05)
        return None

    # ------------------------------------------------------------------ waiting and reading

    async def eventually(self, probe: Callable[[], Awaitable[T | None]], *, timeout: float = 10.0, what: str = "condition") -> T:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await probe()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)

    async def last_request(self) -> OpsRequest | None:
        rows = await self.runtime.audit.log.rows()
        ids = [r["request_id"] for r in rows if r["request_id"] and r["event"] == "requested"]
        return await self.runtime.store.get(ids[-1]) if ids else None

    async def requested(self, *, timeout: float = 10.0) -> OpsRequest:
        """The request the last slash command opened (waits for the card to be posted; a request that
        was the last one before that command does not count)."""
        async def probe() -> OpsRequest | None:
            r = await self.last_request()
            return r if r is not None and r.card_ts and r.id != self._last_before else None
        return await self.eventually(probe, timeout=timeout, what="a request to be opened")

    async def state_of(self, request_id: str, *states: str, timeout: float = 15.0, followed: bool = True) -> OpsRequest:
        """Wait for the request to reach one of ``states``. For a final state, also wait until the
        story is told: the audit row for it is written and its notice is in the card's thread (the
        last thing opsbot does), so tests can read everything right after."""
        async def probe() -> OpsRequest | None:
            r = await self.runtime.store.get(request_id)
            if r is None or r.state.value not in states:
                return None
            if r.state.final:
                if r.state.value not in await self.audit_events(request_id):
                    return None
                mark = _THREAD_MARK[r.state.value]
                if not any(m.text.startswith(mark) for m in self.slack.thread(r.card_channel or "", r.card_ts or "")):
                    return None
                if followed and self.runtime.executor.following_request(request_id):  # its rollout/job's end is part of the story
                    return None
            return r
        return await self.eventually(probe, timeout=timeout, what=f"request {request_id} to be {'/'.join(states)}")

    async def response(self, *, containing: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """The answer (through response_url) to the last slash command that contains ``containing``."""
        async def probe() -> dict[str, Any] | None:
            fresh = self.slack.responses[self._responses_before:]
            return next((r for r in reversed(fresh) if containing in r.get("text", "")), None)
        return await self.eventually(probe, timeout=timeout, what=f"a response containing {containing!r}")

    def audit_lines(self, channel: str = "C0AUDIT", thread_ts: str | None = None) -> list[str]:
        """The audit lines (`` `#N` … hash `…` ``) in the audit channel (or one thread of it), in order:
        the poster may put several rows in one message."""
        messages = self.slack.thread(channel, thread_ts) if thread_ts else self.slack.in_channel(channel)
        return [line for m in messages for line in m.text.splitlines() if line.startswith("`#")]

    async def audit_events(self, request_id: str | None = None) -> list[str]:
        return [r["event"] for r in await self.runtime.audit.log.rows(request_id)]


def slash_body(slack: FakeSlack, user: str, text: str, *, channel: str = "C0INCIDENT", trigger_id: str | None = None) -> str:
    """The form body Slack posts for ``/ops <text>`` (a new trigger_id each time unless given: a retry
    of one invocation carries the same one)."""
    key = trigger_id or uuid.uuid4().hex
    return urlencode({
        "token": "legacy", "team_id": "T0FAKE", "team_domain": "fake", "channel_id": channel, "channel_name": "incident",
        "user_id": user, "user_name": user.lower(), "command": "/ops", "text": text, "api_app_id": "A0OPS",
        "is_enterprise_install": "false", "response_url": slack.response_url(key), "trigger_id": key,
    })


def click_body(slack: FakeSlack, user: str, request_id: str, card_ts: str, decision: str = "approve", *,
               channel: str = "C0INCIDENT", value: str | None = None) -> str:
    """The form body Slack posts for a click on a card's button."""
    ts = card_ts
    action_id = {"approve": "opsbot_approve", "deny": "opsbot_deny", "acknowledge": "opsbot_acknowledge"}[decision]
    payload = {
        "type": "block_actions",
        "team": {"id": "T0FAKE", "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0FAKE"},
        "api_app_id": "A0OPS",
        "token": "legacy",
        "container": {"type": "message", "message_ts": ts, "channel_id": channel, "is_ephemeral": False},
        "trigger_id": uuid.uuid4().hex,
        "channel": {"id": channel, "name": "incident"},
        "message": {"ts": ts, "text": "card"},
        "response_url": slack.response_url("click-" + uuid.uuid4().hex),
        "actions": [{
            "action_id": action_id,
            "block_id": f"opsbot_vote:{request_id}", "value": request_id if value is None else value, "type": "button",
            "action_ts": str(time.time()),
        }],
    }
    return urlencode({"payload": json.dumps(payload)})
