"""Slack payload dicts → opsbot's own frozen types. The only place that knows their shape."""

from __future__ import annotations

from typing import Any

from bot.domain import Actor, ChannelId, CommandRequest, UserId


def command_request(body: dict[str, Any]) -> CommandRequest:
    return CommandRequest(
        actor=Actor(UserId(str(body.get("user_id", ""))), str(body.get("user_name", ""))),
        channel_id=ChannelId(str(body.get("channel_id", ""))),
        # With should_escape, Slack escapes &, < and > in the text (and turns @mentions into <@U…|name>).
        text=str(body.get("text", "")).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"),
        team_id=str(body.get("team_id", "")),
        response_url=str(body.get("response_url", "")),
    )


def click_actor(body: dict[str, Any]) -> Actor:
    user = body.get("user") or {}
    return Actor(UserId(str(user.get("id", ""))), str(user.get("username") or user.get("name") or ""))


def click_channel(body: dict[str, Any]) -> str:
    return str((body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id") or "")
