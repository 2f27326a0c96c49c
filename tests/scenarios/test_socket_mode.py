"""Socket Mode (SLACK_APP_TOKEN set): the same Bolt app, reached over a WebSocket instead of HTTP.
Slack's side is the fake: ``apps.connections.open`` hands out a ws:// URL on the fake, which then
sends a slash-command envelope exactly as Slack does."""

from __future__ import annotations

import uuid

from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

from bot.sandbox.kube_apiserver import KubeApiServer
from tests.conftest import ALICE, CAROL
from tests.harness import Harness


async def test_scale_through_socket_mode(bot: Harness, kube: KubeApiServer) -> None:
    handler = AsyncSocketModeHandler(bot.runtime.bolt, "xapp-test-token")
    await handler.connect_async()
    try:
        await bot.eventually(lambda: _async(bot.slack.sockets), what="the WebSocket connection")
        envelope_id = str(uuid.uuid4())
        await bot.slack.socket_send({
            "envelope_id": envelope_id, "type": "slash_commands", "accepts_response_payload": True,
            "payload": {"team_id": "T0FAKE", "channel_id": Harness.INCIDENT, "user_id": ALICE, "user_name": "alice",
                        "command": "/ops", "text": "scale worker 6", "api_app_id": "A0OPS",
                        "response_url": bot.slack.response_url("sock"), "trigger_id": "t"},
        })
        ack = await bot.eventually(lambda: _async([a for a in bot.slack.socket_acks if a.get("envelope_id") == envelope_id]),
                                   what="the envelope ack")
        assert ack[0]["envelope_id"] == envelope_id
        request = await bot.requested()
        await bot.click(CAROL, request.id)  # the click may come over either transport; HTTP here
        done = await bot.state_of(request.id, "succeeded", "failed")
        assert done.state.value == "succeeded", done.error
        assert kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"] == 6
    finally:
        await handler.close_async()


async def _async(value: object) -> object:
    return value
