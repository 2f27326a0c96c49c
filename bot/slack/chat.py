"""``Chat`` through the Slack Web API (slack_sdk's AsyncWebClient; its base_url is SLACK_API_URL)."""

from __future__ import annotations

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.domain import OpsRequest
from bot.errors import ExecutionError
from bot.slack.blocks import card_blocks, card_fallback

_HINTS = {
    "not_in_channel": "invite the opsbot app to this channel (`/invite @opsbot`)",
    "channel_not_found": "the channel is unknown to the opsbot app; invite it, or check slack.audit_channel",
    "invalid_auth": "SLACK_BOT_TOKEN is not valid",
}


def _slack_error(what: str, exc: SlackApiError) -> ExecutionError:
    code = str(exc.response.get("error", "error"))
    hint = _HINTS.get(code)
    return ExecutionError(f"Slack refused to {what}: {code}" + (f" ({hint})" if hint else ""), temporary=code == "ratelimited")


class SlackChat:
    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client

    async def respond(self, *, response_url: str, channel_id: str, user_id: str, text: str, public: bool = False) -> None:
        if response_url:
            resp = await AsyncWebhookClient(response_url).send(text=text, response_type="in_channel" if public else "ephemeral")
            if resp.status_code < 300:
                return
        try:
            if public:
                await self.client.chat_postMessage(channel=channel_id, text=text)
            else:
                await self.client.chat_postEphemeral(channel=channel_id, user=user_id, text=text)
        except SlackApiError as exc:
            raise _slack_error("reply", exc) from exc

    async def post_card(self, request: OpsRequest) -> tuple[str, str]:
        try:
            resp = await self.client.chat_postMessage(channel=request.channel_id, text=card_fallback(request), blocks=card_blocks(request))
        except SlackApiError as exc:
            raise _slack_error("post the approval card", exc) from exc
        return str(resp["channel"]), str(resp["ts"])

    async def update_card(self, request: OpsRequest) -> None:
        if not (request.card_channel and request.card_ts):
            return
        try:
            await self.client.chat_update(channel=request.card_channel, ts=request.card_ts, text=card_fallback(request),
                                          blocks=card_blocks(request))
        except SlackApiError as exc:
            raise _slack_error("update the approval card", exc) from exc

    async def post_in_thread(self, request: OpsRequest, text: str) -> None:
        try:
            await self.client.chat_postMessage(channel=request.card_channel or request.channel_id, thread_ts=request.card_ts, text=text)
        except SlackApiError as exc:
            raise _slack_error("reply in the request's thread", exc) from exc

    async def post_ephemeral(self, *, channel_id: str, user_id: str, text: str) -> None:
        try:
            await self.client.chat_postEphemeral(channel=channel_id, user=user_id, text=text)
        except SlackApiError as exc:
            raise _slack_error("answer you privately", exc) from exc

    async def post_audit(self, *, channel_id: str, text: str) -> None:
        try:
            await self.client.chat_postMessage(channel=channel_id, text=text, unfurl_links=False, unfurl_media=False)
        except SlackApiError as exc:
            raise _slack_error("post to the audit channel", exc) from exc
