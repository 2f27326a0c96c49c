"""A stand-in for a platform's admin API (seed 004's payout service), served over real HTTP on
127.0.0.1 so that opsbot's real aiohttp client does the talking.

It records every request as it arrived on the wire — method, the path exactly as sent (still
percent-encoded, query included), the headers and the body — and answers what the test told it:
a status and body (default ``200 {"status": "queued"}``), or nothing at all (``hang``: the request is
recorded, no answer comes), a connection closed without an answer (``drop``), or no connection
(``down``: the port is closed, connections are refused).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Seen:
    method: str
    raw_path: str  # as sent: "/v1/admin/mobile-money/payouts/TX%2042/retry"
    headers: dict[str, str]  # names lowercased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AdminApi:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.status, self.body, self.content_type = 200, '{"status": "queued"}', "application/json"
        self.hanging = False
        self.dropping = False
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> AdminApi:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # the same port again after `down`/`up`
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ what it answers

    def answer(self, status: int, body: Any = "", *, content_type: str = "application/json") -> None:
        self.status, self.content_type = status, content_type
        self.body = body if isinstance(body, str) else json.dumps(body)

    def hang(self) -> None:
        """Record requests and never answer (until ``stop``)."""
        self.hanging = True

    def drop(self) -> None:
        """Record requests, then close the connection without an answer (a crash mid-request)."""
        self.dropping = True

    async def down(self) -> None:
        """Close the port: connections are refused, nothing can be received."""
        await self.stop()

    # ------------------------------------------------------------------ the server

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(method=request.method, raw_path=request.raw_path,
                                  headers={k.lower(): v for k, v in request.headers.items()}, body=body))
        if self.hanging:
            await self._release.wait()
        if self.dropping and request.transport is not None:
            request.transport.close()
        return web.Response(status=self.status, text=self.body, content_type=self.content_type)
