"""The baseline: a bare slack-bolt AsyncApp with a `/ops` command that only acks, served by aiohttp
like opsbot. Run by bench/ack_latency.py; argv: port signing-secret slack-api-url."""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient


def main() -> None:
    port, secret, api_url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    app = AsyncApp(client=AsyncWebClient(token="xoxb-test-token", base_url=api_url), signing_secret=secret)

    @app.command("/ops")
    async def ops(ack: Any) -> None:
        await ack()

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    web_app = web.Application()
    web_app.router.add_post("/slack/events", events)
    web_app.router.add_get("/readyz", healthz)
    web.run_app(web_app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
