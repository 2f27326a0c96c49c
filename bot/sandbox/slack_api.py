"""A Slack emulator served over real HTTP: the Web API for the real ``AsyncWebClient`` (via
SLACK_API_URL) and, for `opsbot dev`, the browser playground that plays Slack's client side.

It records every call (method, arguments) and keeps the messages it was asked to post and update
per channel, like the channel a person would see. ``response_url`` endpoints are served too: a
slash command's ``response_url`` points here and what the bot answers through it is recorded.
``fail_with`` makes every Web API call fail, to test outages.

The playground (``/``) is a Slack-like page: pick a user, type `/ops …` in a channel, click the
buttons on the cards. The page talks to this emulator, and the emulator talks to the bot exactly as
Slack does: it signs a slash-command or ``block_actions`` request with the app's signing secret and
POSTs it to the bot's ``/slack/events``; whatever the bot posts back through the Web API or a
``response_url`` is what the page shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, SupportsIndex
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)
    thread_ts: str | None = None
    user: str | None = None  # set for ephemeral messages: who sees it
    author: str | None = None  # a person, for what people type in the playground (else the bot)
    history: list[dict[str, Any]] = field(default_factory=list)  # previous versions (chat.update)

    def buttons(self) -> list[dict[str, Any]]:
        return [e for b in self.blocks if b.get("type") == "actions" for e in b.get("elements", [])]

    def all_text(self) -> str:
        parts = [self.text]
        for b in self.blocks:
            if isinstance(b.get("text"), dict):
                parts.append(b["text"].get("text", ""))
            for e in b.get("elements", []) or []:
                if isinstance(e, dict) and e.get("type") == "mrkdwn":
                    parts.append(e.get("text", ""))
        return "\n".join(parts)


class _Messages(list[Message]):
    """Every message posted, in order, also found by (channel, ts): chat.update looked for its
    message by scanning them all, which grew with every message of a long run (half the bench
    process's CPU in a workers' run, issue 13). Only ``append`` and ``pop`` change it."""

    def __init__(self) -> None:
        super().__init__()
        self.at: dict[tuple[str, str], Message] = {}

    def append(self, m: Message) -> None:
        super().append(m)
        self.at.setdefault((m.channel, m.ts), m)  # (the first of a channel and ts, as a scan finds it)

    def pop(self, index: SupportsIndex = -1) -> Message:
        m = super().pop(index)
        if self.at.get((m.channel, m.ts)) is m:
            del self.at[(m.channel, m.ts)]
        return m

    def _unindexed(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the fake's messages change only by append and pop")

    extend = insert = remove = clear = sort = reverse = __setitem__ = __delitem__ = __iadd__ = _unindexed  # type: ignore[assignment]


class FakeSlack:
    BOT_USER_ID, BOT_ID, APP_ID = "U0BOT", "B0BOT", "A0OPS"  # who the app's bot token is (auth.test)

    def __init__(self, *, bot_events_url: str | None = None, signing_secret: str | None = None,
                 users: dict[str, str] | None = None, channels: dict[str, str] | None = None, token: str = "xoxb-test-token") -> None:
        self.bot_events_url, self.signing_secret, self.token = bot_events_url, signing_secret, token
        self.users = users or {}  # id → display name (the playground's people)
        self.channels = channels or {}  # id → name
        self._response_owner: dict[str, tuple[str, str]] = {}  # response_url key → (user, channel)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.api_peers: list[tuple[str, int]] = []  # the client's (host, port) of each Web API call: its TCP connection
        self.messages = _Messages()
        self.responses: list[dict[str, Any]] = []  # what was sent to response_urls
        self.fail_with: str | None = None
        self.permalink_base = "https://fake.slack"  # `opsbot dev` points it at the playground
        self.fail_methods: dict[str, str] = {}  # method → error, e.g. {"usergroups.users.list": "ratelimited"}
        self.slow_methods: dict[str, float] = {}  # method → seconds: the call is handled, but the answer comes late
        self.down = False  # refuse connections' worth: every call gets HTTP 503
        self.rate_limited: dict[str, int] = {}  # method → Retry-After seconds: the call gets HTTP 429, as Slack answers
        # method → (messages per second, burst), per channel, as Slack limits chat.postMessage (about 1/s
        # sustained per channel, short bursts allowed): past it, HTTP 429 with the Retry-After that
        # Slack would send (whole seconds until the next message is allowed).
        self.channel_rate: dict[str, tuple[float, int]] = {}
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (method, channel) → (tokens, when)
        self.throttled = 0  # calls answered 429 by channel_rate
        self.usergroups: dict[str, list[str]] = {}  # usergroup id → member user ids
        self.views: list[dict[str, Any]] = []  # views.open: {"id", "trigger_id", "view", "open", "user"}; see view_submission_body
        self._triggers: dict[str, str] = {}  # the playground's clicks: trigger_id → who clicked (whose modal it opens)
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.changed = asyncio.Event()
        self.sockets: list[web.WebSocketResponse] = []
        self.socket_acks: list[dict[str, Any]] = []
        self._next_socket = 0
        self.tour: dict[str, Any] | None = None  # `opsbot dev`: who to be and what to type, for the page
        self.panel: Callable[[], Awaitable[dict[str, Any]]] | None = None  # `opsbot dev`: the side panel's data
        self.files: dict[str, dict[str, Any]] = {}  # file id → name, title, content (bytes), where it was shared
        self.upload_fails = False  # the upload URL answers 500 (files_upload_v2's second step fails)
        self.home_views: dict[str, dict[str, Any]] = {}  # user → their Home tab as last published
        self.members: dict[str, list[str]] = {}  # channel → member ids (conversations.members)
        # conversations.open: a DM's conversation id → its user. What is posted or shared with that id
        # lands in the "channel" named by the user id, with the DMs chat.postMessage sends to a user id.
        self.dm_ids: dict[str, str] = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self, key: str) -> str:
        return f"http://127.0.0.1:{self.port}/response/{key}"

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)  # most methods POST; some (usergroups.users.list) GET
        app.router.add_post("/response/{key}", self._response)
        app.router.add_get("/socket", self._socket)
        app.router.add_get("/", self._page)
        app.router.add_get("/playground/state", self._state)
        app.router.add_get("/playground/panel", self._panel)
        app.router.add_post("/playground/command", self._command)
        app.router.add_post("/playground/action", self._action)
        app.router.add_post("/playground/view", self._submit_view)
        app.router.add_post("/playground/view/close", self._close_view)
        app.router.add_get("/playground/personal", self._personal)
        self._timeline_home_routes(app)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _args(self, request: web.Request) -> dict[str, Any]:
        raw = await request.text()
        if request.method == "GET":
            return dict(request.query)
        if request.content_type == "application/json":
            parsed: dict[str, Any] = json.loads(raw or "{}")
            return parsed
        args: dict[str, Any] = dict(parse_qsl(raw))
        for key in ("blocks", "attachments"):
            if isinstance(args.get(key), str):
                args[key] = json.loads(args[key])
        return args

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def _response(self, request: web.Request) -> web.Response:
        body = await self._args(request)
        key = request.match_info["key"]
        self.responses.append({"key": key, **body})
        owner = self._response_owner.get(key)
        if owner:  # shown in the playground: in the channel, or only to the person who typed the command
            user, channel = owner
            ts = f"{1700000000 + next(self._ts)}.000300"
            self.messages.append(Message(channel=channel, ts=ts, text=body.get("text", ""), blocks=body.get("blocks") or [],
                                         user=None if body.get("response_type") == "in_channel" else user))
        self._notify()
        return web.Response(text="ok")

    # ------------------------------------------------------------------ the playground

    async def _page(self, request: web.Request) -> web.Response:
        html = resources.files("bot.sandbox").joinpath("playground.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def _state(self, request: web.Request) -> web.Response:
        user = request.query.get("user", "")

        def view(m: Message) -> dict[str, Any]:
            return {"ts": m.ts, "text": m.text, "blocks": m.blocks, "thread_ts": m.thread_ts, "ephemeral": m.user is not None,
                    "edited": bool(m.history), "author": self.users.get(m.author, m.author) if m.author else None}

        shown = [m for m in self.messages if m.user is None or m.user == user]
        return web.json_response({
            "users": [{"id": k, "name": v} for k, v in self.users.items()],
            "channels": [{"id": k, "name": v} for k, v in self.channels.items()],
            "messages": {c: [view(m) for m in shown if m.channel == c] for c in self.channels},
            "tour": self.tour,
        })

    async def _panel(self, request: web.Request) -> web.Response:
        """The side panel: the data the commands act on, read live by whoever started the playground."""
        if self.panel is None:
            return web.json_response({"sections": []})
        return web.json_response(await self.panel())

    async def _forward(self, body: str) -> tuple[int, str]:
        """Sign and POST to the bot, as Slack does."""
        if not self.bot_events_url or not self.signing_secret:
            return 503, "the playground is not connected to a bot"
        ts = str(int(time.time()))
        sig = str(SignatureVerifier(self.signing_secret).generate_signature(timestamp=ts, body=body))
        headers: dict[str, str] = {"Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": ts,
                                   "X-Slack-Signature": sig}
        async with aiohttp.ClientSession() as http, http.post(self.bot_events_url, data=body.encode(), headers=headers) as r:
            return r.status, await r.text()

    async def _command(self, request: web.Request) -> web.Response:
        data = await request.json()
        user, channel, text = str(data["user"]), str(data["channel"]), str(data["text"]).strip()
        command, _, rest = text.partition(" ")
        if not text:
            return web.json_response({"error": "nothing to send"}, status=400)
        if not text.startswith("/"):  # a plain message, as a person posts it in the channel
            self.post_as(user, channel, text)
            return web.json_response({"status": 200})
        if command != "/ops":  # Slack answers an unknown slash command only to the person who typed it
            self.messages.append(Message(channel=channel, ts=f"{1700000000 + next(self._ts)}.000700", user=user,
                                         text=f"`{command}` is not a valid command here: only /ops is installed."))
            self._notify()
            return web.json_response({"error": "only the /ops command is installed here"}, status=400)
        key = uuid.uuid4().hex
        self._response_owner[key] = (user, channel)
        self.messages.append(Message(channel=channel, ts=f"{1700000000 + next(self._ts)}.000400", text=f"`{text}`",
                                     user=user, author=user))
        body = urlencode({"token": "legacy", "team_id": "T0PLAY", "team_domain": "playground", "channel_id": channel,
                          "channel_name": self.channels.get(channel, channel), "user_id": user,
                          "user_name": self.users.get(user, user).split(" ")[0], "command": "/ops", "text": rest,
                          "api_app_id": "A0OPS", "response_url": f"http://127.0.0.1:{self.port}/response/{key}", "trigger_id": key})
        status, ack = await self._forward(body)
        if ack.strip():  # an ack with text: Slack shows it only to the person who typed the command
            try:
                ack_text = json.loads(ack).get("text", ack)
            except ValueError:
                ack_text = ack
            self.messages.append(Message(channel=channel, ts=f"{1700000000 + next(self._ts)}.000500", text=ack_text, user=user))
        self._notify()
        return web.json_response({"status": status})

    async def _action(self, request: web.Request) -> web.Response:
        data = await request.json()
        user, channel = str(data["user"]), str(data["channel"])
        payload = {
            "type": "block_actions", "team": {"id": "T0PLAY", "domain": "playground"},
            "user": {"id": user, "username": self.users.get(user, user).split(" ")[0], "name": self.users.get(user, user),
                     "team_id": "T0PLAY"},
            "api_app_id": "A0OPS", "token": "legacy", "trigger_id": uuid.uuid4().hex,
            "container": {"type": "message", "message_ts": data["message_ts"], "channel_id": channel, "is_ephemeral": False},
            "channel": {"id": channel, "name": self.channels.get(channel, channel)},
            "message": {"ts": data["message_ts"], "text": ""},
            "response_url": f"http://127.0.0.1:{self.port}/response/{uuid.uuid4().hex}",
            "actions": [{"action_id": data["action_id"], "block_id": data.get("block_id", ""), "value": data.get("value", ""),
                         "type": "button", "action_ts": str(time.time())}],
        }
        self._triggers[str(payload["trigger_id"])] = user
        status, _ = await self._forward(urlencode({"payload": json.dumps(payload)}))
        return web.json_response({"status": status})

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        """Socket Mode: say hello, then relay envelopes from ``socket_send`` and record the acks."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "fake"},
                            "connection_info": {"app_id": "A0OPS"}})
        async for msg in ws:
            if msg.type == 1:  # aiohttp.WSMsgType.TEXT
                self.socket_acks.append(json.loads(msg.data))
                self._notify()
        return ws

    async def socket_send(self, envelope: dict[str, Any], *, connection: int | None = None) -> int:
        """Hand an envelope to ONE open connection, as Slack does when an app has several (round robin,
        or the ``connection``-th open one: a retry of an envelope may go to another connection than the
        first delivery). Returns the index of the connection used."""
        open_ = [ws for ws in self.sockets if not ws.closed]
        if not open_:
            raise RuntimeError("no Socket Mode connection is open")
        if connection is None:
            connection = self._next_socket % len(open_)
            self._next_socket += 1
        await open_[connection % len(open_)].send_json(envelope)
        return connection % len(open_)

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.api_peers.append((str(peer[0]), int(peer[1])))
        args = {**request.query, **await self._args(request)}  # slack_sdk sends some methods' arguments as query parameters
        if self.down:
            return web.Response(status=503, text="Slack is down (fake)")
        if method == "apps.connections.open":
            if request.headers.get("Authorization", "") != "Bearer xapp-test-token":
                return web.json_response({"ok": False, "error": "invalid_auth"})
            self.calls.append((method, args))
            return web.json_response({"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"})
        if request.headers.get("Authorization", "") != f"Bearer {self.token}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        self.calls.append((method, args))
        retry = self._over_rate(method, str(args.get("channel", "")))
        if retry:
            self.throttled += 1
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry)})
        if method in self.rate_limited:
            self._notify()
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                     headers={"Retry-After": str(self.rate_limited[method])})
        if self.fail_with or method in self.fail_methods:
            self._notify()
            return web.json_response({"ok": False, "error": self.fail_with or self.fail_methods[method]})
        result = self._handle(method, args)
        self._notify()
        if method in self.slow_methods:
            await asyncio.sleep(self.slow_methods[method])
        return web.json_response(result)

    def _over_rate(self, method: str, channel: str) -> int:
        """0 when the call may go through (a token bucket per method and channel), else Retry-After."""
        if method not in self.channel_rate:
            return 0
        rate, burst = self.channel_rate[method]
        now = time.monotonic()
        tokens, when = self._buckets.get((method, channel), (float(burst), now))
        tokens = min(float(burst), tokens + (now - when) * rate)
        if tokens >= 1:
            self._buckets[(method, channel)] = (tokens - 1, now)
            return 0
        self._buckets[(method, channel)] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / rate))

    def _handle(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        shared_to = str(args.get("channel_id") or "")
        if method == "files.completeUploadExternal" and (shared_to in self.users or shared_to.startswith(("U", "W"))):
            return {"ok": False, "error": "channel_not_found"}  # as Slack: a file is shared in a conversation, not to a user id
        for key in ("channel", "channel_id"):  # a DM's conversation id (conversations.open) is where DMs to the user land
            if str(args.get(key, "")) in self.dm_ids:
                args = {**args, key: self.dm_ids[str(args[key])]}
        mine = self._timeline_home_api(method, args)
        if mine is not None:
            return mine
        if method == "auth.test":
            return {"ok": True, "url": "https://fake.slack/", "team": "Fake", "user": "opsbot", "team_id": "T0FAKE",
                    "user_id": self.BOT_USER_ID, "bot_id": self.BOT_ID}
        if method == "chat.postMessage":
            ts = f"{1700000000 + next(self._ts)}.000100"
            blocks = args.get("blocks") or []
            self.messages.append(Message(channel=args["channel"], ts=ts, text=args.get("text", ""), blocks=blocks,
                                         thread_ts=args.get("thread_ts")))
            return {"ok": True, "channel": args["channel"], "ts": ts, "message": {"text": args.get("text", ""), "ts": ts}}
        if method == "chat.update":
            found = self.messages.at.get((args["channel"], args["ts"]))
            if found is not None:
                found.history.append({"text": found.text, "blocks": found.blocks})
                found.text, found.blocks = args.get("text", ""), args.get("blocks") or []
                return {"ok": True, "channel": found.channel, "ts": found.ts}
            return {"ok": False, "error": "message_not_found"}
        if method == "chat.postEphemeral":
            ts = f"{1700000000 + next(self._ts)}.000200"
            self.messages.append(Message(channel=args["channel"], ts=ts, text=args.get("text", ""), user=args["user"]))
            return {"ok": True, "message_ts": ts}
        if method == "chat.getPermalink":
            return {"ok": True, "channel": args["channel"],
                    "permalink": f"{self.permalink_base}/archives/{args['channel']}/p{str(args['message_ts']).replace('.', '')}"}
        if method in ("conversations.history", "conversations.replies"):
            msgs = [m for m in self.messages if m.channel == args["channel"] and m.user is None]
            if method == "conversations.history":  # newest first, as Slack answers
                msgs = list(reversed([m for m in msgs if m.thread_ts is None]))
            else:  # the parent, then its replies oldest first, as Slack answers
                msgs = [m for m in msgs if m.ts == args["ts"] or m.thread_ts == args["ts"]]
            return {"ok": True, "has_more": False, "messages": [self._message_json(m) for m in msgs]}
        if method == "views.open":
            return self._views_open(args)
        if method == "usergroups.users.list":
            if args.get("usergroup") not in self.usergroups:
                return {"ok": False, "error": "no_such_subteam"}
            return {"ok": True, "users": self.usergroups[args["usergroup"]]}
        return {"ok": False, "error": "unknown_method"}

    def _message_json(self, m: Message) -> dict[str, Any]:
        """A message as the Web API returns it: ``user`` is who posted it; a message the app posted
        with its bot token also carries the bot's ``bot_id`` and ``app_id`` (``user`` is then the bot user)."""
        who: dict[str, Any] = ({"user": m.author} if m.author else
                               {"user": self.BOT_USER_ID, "bot_id": self.BOT_ID, "app_id": self.APP_ID})
        return {"type": "message", "ts": m.ts, "text": m.text, **who, **({"thread_ts": m.thread_ts} if m.thread_ts else {})}

    def post_as(self, user: str, channel: str, text: str, *, thread_ts: str | None = None) -> Message:
        """A person posts in a channel (or a thread), as they would from their Slack client."""
        m = Message(channel=channel, ts=f"{1700000000 + next(self._ts)}.000600", text=text, thread_ts=thread_ts, author=user)
        self.messages.append(m)
        self._notify()
        return m

    # --- modals (views.open) and their submission

    def _views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        """Record the modal; it stays open until submitted (``view_submission_body``). A direct
        message is a chat.postMessage to a user id: it lands in the "channel" named by that id."""
        view = args.get("view")
        if isinstance(view, str):
            view = json.loads(view)
        if not args.get("trigger_id") or not isinstance(view, dict):
            return {"ok": False, "error": "invalid_arguments"}
        opened = {"id": f"V{len(self.views) + 1:08d}", "trigger_id": args["trigger_id"], "view": view, "open": True,
                  "user": self._triggers.get(args["trigger_id"])}
        self.views.append(opened)
        return {"ok": True, "view": {"id": opened["id"], **view}}

    def open_views(self, callback_id: str | None = None) -> list[dict[str, Any]]:
        return [v for v in self.views if v["open"] and (callback_id is None or v["view"].get("callback_id") == callback_id)]

    def view_submission_body(self, view_id: str, user: str, values: dict[str, str], *,
                             private_metadata: str | None = None) -> str:
        """The signed-to-be body Slack posts when ``user`` submits the modal ``view_id``: ``values``
        maps each input block id to its text (block id = action id, as opsbot's dialogs use).
        ``private_metadata`` overrides the view's own (a forged submission)."""
        opened = next(v for v in self.views if v["id"] == view_id)
        view = opened["view"]
        state = {"values": {block: {block: {"type": "plain_text_input", "value": text}} for block, text in values.items()}}
        payload = {
            "type": "view_submission", "team": {"id": "T0FAKE", "domain": "fake"},
            "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0FAKE"},
            "api_app_id": "A0OPS", "token": "legacy", "trigger_id": uuid.uuid4().hex,
            "view": {"id": view_id, "type": "modal", "callback_id": view.get("callback_id", ""), "state": state,
                     "private_metadata": view.get("private_metadata", "") if private_metadata is None else private_metadata,
                     "blocks": view.get("blocks", []), "title": view.get("title"), "app_id": "A0OPS", "team_id": "T0FAKE"},
            "response_urls": [],
        }
        return urlencode({"payload": json.dumps(payload)})

    async def _submit_view(self, request: web.Request) -> web.Response:
        """The playground submits a modal: signed and forwarded like Slack does; an ``errors``
        answer keeps it open (and is returned for the page to show)."""
        data = await request.json()
        body = self.view_submission_body(str(data["view_id"]), str(data["user"]), {str(k): str(v) for k, v in data["values"].items()})
        status, answer = await self._forward(body)
        errors: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(answer) if answer.strip() else {}
            errors = parsed.get("errors", {}) if isinstance(parsed, dict) else {}
        if status == 200 and not errors:
            self.close_view(str(data["view_id"]))
        self._notify()
        return web.json_response({"status": status, "errors": errors})

    async def _close_view(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.close_view(str(data["view_id"]))
        self._notify()
        return web.json_response({"ok": True})

    async def _personal(self, request: web.Request) -> web.Response:
        """The playground's person: the modal open for them, and their direct messages from opsbot."""
        user = request.query.get("user", "")
        views = [{"id": v["id"], "view": v["view"]} for v in self.views if v["open"] and v.get("user") == user]
        dms = [{"ts": m.ts, "text": m.text} for m in self.messages if m.channel == user and m.user is None]
        return web.json_response({"views": views[-1:], "dms": dms[-20:]})

    def close_view(self, view_id: str) -> None:
        for v in self.views:
            if v["id"] == view_id:
                v["open"] = False

    # ------------------------------------------------------------------ files, Home tabs, members (issue 14)
    #
    # Files as Slack takes them since files.upload was retired (slack_sdk's files_upload_v2):
    # files.getUploadURLExternal gives an upload URL (served here, as Slack serves files.slack.com),
    # the client POSTs the bytes to it, then files.completeUploadExternal shares the file in a
    # channel or thread. views.publish keeps one Home tab per user (its view id stays the same across
    # publishes, as Slack's does); ``open_home`` sends ``app_home_opened`` to the bot, signed.

    def _timeline_home_routes(self, app: web.Application) -> None:
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_post("/playground/home", self._play_home)
        app.router.add_get("/playground/home", self._play_home_view)
        app.router.add_post("/playground/home_action", self._play_home_action)
        app.router.add_get("/playground/file/{file_id}", self._play_file)

    def _timeline_home_api(self, method: str, args: dict[str, Any]) -> dict[str, Any] | None:
        if method == "files.getUploadURLExternal":
            length = str(args.get("length", ""))
            if not args.get("filename") or not length.isdigit():
                return {"ok": False, "error": "invalid_arguments"}
            file_id = f"F{next(self._ts):08d}"
            self.files[file_id] = {"id": file_id, "name": str(args["filename"]), "length": int(length), "content": None,
                                   "shared": None}
            return {"ok": True, "file_id": file_id, "upload_url": f"http://127.0.0.1:{self.port}/upload/{file_id}"}
        if method == "files.completeUploadExternal":
            try:
                wanted = json.loads(str(args.get("files") or "[]"))
            except ValueError:
                return {"ok": False, "error": "invalid_arguments"}
            done = []
            for want in wanted if isinstance(wanted, list) else []:
                f = self.files.get(str(want.get("id") if isinstance(want, dict) else ""))
                if f is None or f["content"] is None:
                    return {"ok": False, "error": "file_not_found" if f is None else "file_upload_incomplete"}
                f["title"] = str(want.get("title") or f["name"])
                done.append(f)
            channel, thread = args.get("channel_id"), args.get("thread_ts")
            for f in done:
                if channel:
                    f["shared"] = {"channel": channel, "thread_ts": thread}
                    ts = f"{1700000000 + next(self._ts)}.000800"
                    self.messages.append(Message(channel=str(channel), ts=ts, text=str(args.get("initial_comment") or ""),
                                                 thread_ts=str(thread) if thread else None,
                                                 blocks=[{"type": "file", "file_id": f["id"], "title": f["title"], "name": f["name"]}]))
            return {"ok": True, "files": [{"id": f["id"], "name": f["name"], "title": f["title"]} for f in done]}
        if method == "views.publish":
            user = str(args.get("user_id") or "")
            if user not in self.users and not user.startswith(("U", "W")):
                return {"ok": False, "error": "invalid_arguments"}
            view = args.get("view")
            if isinstance(view, str):
                try:
                    view = json.loads(view)
                except ValueError:
                    return {"ok": False, "error": "invalid_arguments"}
            if not isinstance(view, dict) or view.get("type") != "home":
                return {"ok": False, "error": "invalid_arguments"}
            if len(view.get("blocks") or []) > 100:
                return {"ok": False, "error": "invalid_blocks"}
            old = self.home_views.get(user)
            published = {**view, "id": old["id"] if old else f"V{next(self._ts):08d}", "app_id": self.APP_ID, "bot_id": self.BOT_ID,
                         "team_id": "T0FAKE", "hash": uuid.uuid4().hex[:16]}
            self.home_views[user] = published
            return {"ok": True, "view": published}
        if method == "conversations.open":  # one user: their DM with the app (the id Slack gives is stable per user)
            user = str(args.get("users") or "")
            if not user or "," in user or (user not in self.users and not user.startswith(("U", "W"))):
                return {"ok": False, "error": "user_not_found" if user and "," not in user else "invalid_arguments"}
            dm = "D" + user[1:]
            self.dm_ids[dm] = user
            return {"ok": True, "channel": {"id": dm}}
        if method == "conversations.members":
            channel = str(args.get("channel") or "")
            if channel not in self.members and channel not in self.channels:
                return {"ok": False, "error": "channel_not_found"}
            # the playground's people are in all its channels unless a test says otherwise
            members = self.members.get(channel, list(self.users))
            return {"ok": True, "members": members, "response_metadata": {"next_cursor": ""}}
        return None

    async def _upload(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return web.Response(status=404, text="no such upload")
        if self.upload_fails:
            return web.Response(status=500, text="upload failed (fake)")
        data = await request.read()
        f["content"] = data
        return web.Response(text=f"OK - {len(data)}")

    def home_opened_body(self, user: str, *, tab: str = "home") -> str:
        """The JSON body Slack posts for ``app_home_opened`` (Events API)."""
        return json.dumps({
            "token": "legacy", "team_id": "T0FAKE", "api_app_id": self.APP_ID, "type": "event_callback",
            "event_id": "Ev" + uuid.uuid4().hex[:10].upper(), "event_time": int(time.time()),
            "event": {"type": "app_home_opened", "user": user, "channel": "D" + user[1:], "tab": tab,
                      "event_ts": f"{time.time():.6f}", **({"view": self.home_views[user]} if user in self.home_views else {})},
            "authorizations": [{"team_id": "T0FAKE", "user_id": self.BOT_USER_ID, "is_bot": True}],
        })

    def home_click_body(self, user: str, request_id: str, *, view: dict[str, Any] | None = None,
                        action_id: str = "opsbot_home_approve") -> str:
        """The form body Slack posts for a click on a button in ``user``'s Home tab (``view``: the
        view it was clicked in, by default the one published for ``user``)."""
        shown = view if view is not None else self.home_views.get(user, {"id": "V0NONE", "type": "home"})
        payload = {
            "type": "block_actions", "team": {"id": "T0FAKE", "domain": "fake"},
            "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0FAKE"},
            "api_app_id": self.APP_ID, "token": "legacy", "trigger_id": uuid.uuid4().hex,
            "container": {"type": "view", "view_id": shown.get("id")},
            "view": shown,
            "actions": [{"action_id": action_id, "block_id": f"opsbot_home:{request_id}", "value": request_id, "type": "button",
                         "action_ts": str(time.time())}],
        }
        return urlencode({"payload": json.dumps(payload)})

    async def _forward_json(self, body: str) -> tuple[int, str]:
        if not self.bot_events_url or not self.signing_secret:
            return 503, "the playground is not connected to a bot"
        ts = str(int(time.time()))
        sig = str(SignatureVerifier(self.signing_secret).generate_signature(timestamp=ts, body=body))
        headers = {"Content-Type": "application/json", "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}
        async with aiohttp.ClientSession() as http, http.post(self.bot_events_url, data=body.encode(), headers=headers) as r:
            return r.status, await r.text()

    async def _play_home(self, request: web.Request) -> web.Response:
        """The playground's Home tab was opened: Slack sends ``app_home_opened``."""
        user = str((await request.json()).get("user", ""))
        status, _ = await self._forward_json(self.home_opened_body(user))
        return web.json_response({"status": status})

    async def _play_home_view(self, request: web.Request) -> web.Response:
        return web.json_response({"view": self.home_views.get(request.query.get("user", ""))})

    async def _play_file(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None or f["content"] is None:
            return web.Response(status=404, text="no such file")
        return web.Response(body=f["content"], content_type="text/plain", charset="utf-8")

    async def _play_home_action(self, request: web.Request) -> web.Response:
        data = await request.json()
        status, _ = await self._forward(self.home_click_body(str(data["user"]), str(data.get("value", "")),
                                                             action_id=str(data.get("action_id") or "opsbot_home_approve")))
        return web.json_response({"status": status})

    # --- what tests read

    def in_channel(self, channel: str) -> list[Message]:
        return [m for m in self.messages if m.channel == channel and m.user is None and m.thread_ts is None]

    def thread(self, channel: str, ts: str) -> list[Message]:
        return [m for m in self.messages if m.channel == channel and m.thread_ts == ts]

    def ephemeral_to(self, user: str) -> list[Message]:
        return [m for m in self.messages if m.user == user]

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        return [a for m, a in self.calls if m == method]
