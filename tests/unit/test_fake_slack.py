"""The fake Slack's chat.update finds its message by (channel, ts) from an index kept with the list
of messages (issue 13: it scanned every message, half the bench process's CPU in a long run):
through the real AsyncWebClient, the message updated is the one a scan would find, and nothing else."""

from __future__ import annotations

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.sandbox.slack_api import FakeSlack, Message


async def test_chat_update_changes_exactly_the_message_of_its_channel_and_ts() -> None:
    slack = await FakeSlack().start()
    try:
        web = AsyncWebClient(token="xoxb-test-token", base_url=slack.api_url)
        a = (await web.chat_postMessage(channel="C1", text="one"))["ts"]
        b = (await web.chat_postMessage(channel="C1", text="two"))["ts"]
        c = (await web.chat_postMessage(channel="C2", text="three"))["ts"]
        await web.chat_update(channel="C1", ts=b, text="two, updated")
        assert [(m.channel, m.text) for m in slack.messages] == [("C1", "one"), ("C1", "two, updated"), ("C2", "three")]
        assert slack.messages[1].history == [{"text": "two", "blocks": []}]
        for channel, ts in (("C2", a), ("C1", c), ("C1", "1700000000.000100\x00"), ("C1", a + "0")):  # wrong channel, forged ts
            with pytest.raises(SlackApiError, match="message_not_found"):
                await web.chat_update(channel=channel, ts=ts, text="x")
        popped = slack.messages.pop()  # (as bench/incident_load.py keeps its cards out of the list)
        assert popped.ts == c and (popped.channel, popped.ts) not in slack.messages.at
        with pytest.raises(SlackApiError, match="message_not_found"):
            await web.chat_update(channel="C2", ts=c, text="x")
        assert [m.text for m in slack.messages] == ["one", "two, updated"]
        with pytest.raises(TypeError, match="only by append and pop"):
            slack.messages.insert(0, Message(channel="C1", ts="1.1", text="sneaked in"))
    finally:
        await slack.stop()
