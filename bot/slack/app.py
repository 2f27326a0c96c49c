"""The Slack edge: a slack-bolt AsyncApp with the `/ops` command and the Approve/Deny buttons.

The ack never waits on Kubernetes, the databases or the queue. Parsing is pure (config lookups
only), so a usage error is the ack itself; everything else runs after the ack (Bolt keeps the
listener running once ``ack()`` has answered Slack's HTTP request, in its default
``process_before_response=False`` mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot.approvals import Approvals
from bot.domain import Invocation
from bot.errors import OpsbotError, UserError
from bot.pipeline import Pipeline
from bot.slack.blocks import ACKNOWLEDGE, APPROVE, DENY
from bot.slack.payloads import click_actor, click_channel, command_request

log = logging.getLogger(__name__)


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


def build_app(*, client: AsyncWebClient, signing_secret: str, pipeline: Pipeline, approvals: Approvals,
              inflight: set[asyncio.Task[Any]]) -> AsyncApp:
    app = AsyncApp(client=client, signing_secret=signing_secret, process_before_response=False,
                   ignoring_self_events_enabled=True)

    @app.command("/ops")
    async def ops(ack: Any, body: dict[str, Any]) -> None:
        with _tracked(inflight):
            await _ops(ack, body)

    async def _ops(ack: Any, body: dict[str, Any]) -> None:
        req = command_request(body)
        inv: Invocation | None = None
        error: UserError | None = None
        try:
            inv = pipeline.parse(req)
        except UserError as exc:
            error = exc
        if error is not None:
            await ack(text=f":x: {error}")
            await pipeline.record_invalid(req, error)
            return
        assert inv is not None
        await ack()
        await pipeline.handle(req, inv)

    @app.action(re.compile(f"^({APPROVE}|{DENY})$"))
    async def vote(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with _tracked(inflight):
            await _vote(ack, body, action)

    async def _vote(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        actor, channel = click_actor(body), click_channel(body)
        try:
            await approvals.click(str(action.get("value", "")), actor, "approve" if action["action_id"] == APPROVE else "deny",
                                  channel_id=channel)
        except OpsbotError as exc:
            await approvals.chat.post_ephemeral(channel_id=channel, user_id=actor.user_id,
                                                text=f":x: Your click was not recorded: {exc}")

    @app.action(ACKNOWLEDGE)
    async def acknowledge(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        with _tracked(inflight):
            await ack()
            actor, channel = click_actor(body), click_channel(body)
            try:
                await approvals.acknowledge(str(action.get("value", "")), actor, channel_id=channel)
            except OpsbotError as exc:
                await approvals.chat.post_ephemeral(channel_id=channel, user_id=actor.user_id,
                                                    text=f":x: Your review was not recorded: {exc}")

    return app
