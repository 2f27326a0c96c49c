"""A fake Slack Web API served over real HTTP, for the real ``AsyncWebClient`` (via SLACK_API_URL).

It records every call (method, arguments) and keeps the messages it was asked to post and update
per channel, like the channel a person would see. ``response_url`` endpoints are served too: a
slash command's ``response_url`` points here and what the bot answers through it is recorded.
``fail_with`` makes every Web API call fail, to test outages.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)
    thread_ts: str | None = None
    user: str | None = None  # set for ephemeral messages: who sees it
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


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.messages: list[Message] = []
        self.responses: list[dict[str, Any]] = []  # what was sent to response_urls
        self.fail_with: str | None = None
        self.fail_methods: dict[str, str] = {}  # method → error, e.g. {"usergroups.users.list": "ratelimited"}
        self.slow_methods: dict[str, float] = {}  # method → seconds: the call is handled, but the answer comes late
        self.down = False  # refuse connections' worth: every call gets HTTP 503
        self.usergroups: dict[str, list[str]] = {}  # usergroup id → member user ids
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.changed = asyncio.Event()
        self.sockets: list[web.WebSocketResponse] = []
        self.socket_acks: list[dict[str, Any]] = []

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self, key: str) -> str:
        return f"http://127.0.0.1:{self.port}/response/{key}"

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)  # most methods POST; some (usergroups.users.list) GET
        app.router.add_post("/response/{key}", self._response)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
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
            return json.loads(raw or "{}")
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
        self.responses.append({"key": request.match_info["key"], **body})
        self._notify()
        return web.Response(text="ok")

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

    async def socket_send(self, envelope: dict[str, Any]) -> None:
        for ws in self.sockets:
            if not ws.closed:
                await ws.send_json(envelope)

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._args(request)
        if self.down:
            return web.Response(status=503, text="Slack is down (fake)")
        if method == "apps.connections.open":
            if request.headers.get("Authorization", "") != "Bearer xapp-test-token":
                return web.json_response({"ok": False, "error": "invalid_auth"})
            self.calls.append((method, args))
            return web.json_response({"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"})
        if request.headers.get("Authorization", "") != "Bearer xoxb-test-token":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        self.calls.append((method, args))
        if self.fail_with or method in self.fail_methods:
            self._notify()
            return web.json_response({"ok": False, "error": self.fail_with or self.fail_methods[method]})
        result = self._handle(method, args)
        self._notify()
        if method in self.slow_methods:
            await asyncio.sleep(self.slow_methods[method])
        return web.json_response(result)

    def _handle(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        if method == "auth.test":
            return {"ok": True, "url": "https://fake.slack/", "team": "Fake", "user": "opsbot", "team_id": "T0FAKE",
                    "user_id": "U0BOT", "bot_id": "B0BOT"}
        if method == "chat.postMessage":
            ts = f"{1700000000 + next(self._ts)}.000100"
            blocks = args.get("blocks") or []
            self.messages.append(Message(channel=args["channel"], ts=ts, text=args.get("text", ""), blocks=blocks,
                                         thread_ts=args.get("thread_ts")))
            return {"ok": True, "channel": args["channel"], "ts": ts, "message": {"text": args.get("text", ""), "ts": ts}}
        if method == "chat.update":
            for m in self.messages:
                if m.channel == args["channel"] and m.ts == args["ts"]:
                    m.history.append({"text": m.text, "blocks": m.blocks})
                    m.text, m.blocks = args.get("text", ""), args.get("blocks") or []
                    return {"ok": True, "channel": m.channel, "ts": m.ts}
            return {"ok": False, "error": "message_not_found"}
        if method == "chat.postEphemeral":
            ts = f"{1700000000 + next(self._ts)}.000200"
            self.messages.append(Message(channel=args["channel"], ts=ts, text=args.get("text", ""), user=args["user"]))
            return {"ok": True, "message_ts": ts}
        if method == "chat.getPermalink":
            return {"ok": True, "channel": args["channel"],
                    "permalink": f"https://fake.slack/archives/{args['channel']}/p{str(args['message_ts']).replace('.', '')}"}
        if method in ("conversations.history", "conversations.replies"):
            msgs = [m for m in self.messages if m.channel == args["channel"] and m.user is None]
            if method == "conversations.history":
                msgs = [m for m in msgs if m.thread_ts is None]
            else:
                msgs = [m for m in msgs if m.ts == args["ts"] or m.thread_ts == args["ts"]]
            return {"ok": True, "has_more": False, "messages": [
                {"type": "message", "ts": m.ts, "text": m.text, **({"thread_ts": m.thread_ts} if m.thread_ts else {})}
                for m in reversed(msgs)]}
        if method == "usergroups.users.list":
            if args.get("usergroup") not in self.usergroups:
                return {"ok": False, "error": "no_such_subteam"}
            return {"ok": True, "users": self.usergroups[args["usergroup"]]}
        if method == "users.info":
            return {"ok": True, "user": {"id": args.get("user"), "name": args.get("user", "").lower()}}
        return {"ok": False, "error": "unknown_method"}

    # --- what tests read

    def in_channel(self, channel: str) -> list[Message]:
        return [m for m in self.messages if m.channel == channel and m.user is None and m.thread_ts is None]

    def thread(self, channel: str, ts: str) -> list[Message]:
        return [m for m in self.messages if m.channel == channel and m.thread_ts == ts]

    def ephemeral_to(self, user: str) -> list[Message]:
        return [m for m in self.messages if m.user == user]

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        return [a for m, a in self.calls if m == method]
