"""Slack payload dicts → opsbot's own frozen types. The only place that knows their shape.

A payload passed Slack's signature check, but its fields are still checked here before anything
uses them: ids must look like Slack ids (a user id with a NUL or a quote in it goes nowhere near
SQL, the audit trail or a mention), names are made storable, and a button's value must look like
an opsbot request id. A payload that fails these checks is refused with ``MalformedPayload``, whose
message says what was wrong; the edge answers it and records the attempt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bot.domain import REQUEST_ID_PATTERN, Actor, ChannelId, CommandRequest, UserId
from bot.errors import MalformedPayload
from bot.untrusted import storable

_USER_ID = re.compile(r"[UWB][A-Z0-9]{1,20}")
_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{1,20}")
_TRIGGER_ID = re.compile(r"[A-Za-z0-9._-]{1,100}")  # Slack: "13345224609.738474920.8088930838d88f008e0"
_MESSAGE_TS = re.compile(r"[0-9]{1,12}\.[0-9]{1,9}")


def _field(value: Any, pattern: re.Pattern[str], what: str) -> str:
    text = value if isinstance(value, str) else ""
    if not pattern.fullmatch(text):
        shown = storable(str(value) if value is not None else "", 40)
        raise MalformedPayload(f"this request's {what} (`{shown}`) is not a Slack {what}; it was refused.")
    return text


def _name(value: Any) -> str:
    return str(storable(value if isinstance(value, str) else "", 80))


def command_request(body: dict[str, Any]) -> CommandRequest:
    text = body.get("text", "")
    return CommandRequest(
        actor=Actor(UserId(_field(body.get("user_id"), _USER_ID, "user id")), _name(body.get("user_name"))),
        channel_id=ChannelId(_field(body.get("channel_id"), _CHANNEL_ID, "channel id")),
        # With should_escape, Slack escapes &, < and > in the text (and turns @mentions into <@U…|name>).
        text=(text if isinstance(text, str) else "").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"),
        team_id=_name(body.get("team_id")),
        response_url=body["response_url"] if isinstance(body.get("response_url"), str) else "",
        delivery_id=_delivery_id(body.get("trigger_id")),
    )


def _delivery_id(value: Any) -> str:
    """Slack's trigger_id (``13345224609.738474920.8088930838d88f008e0``), or "" when it is not one."""
    return value if isinstance(value, str) and _TRIGGER_ID.fullmatch(value) else ""


def unchecked_request(body: dict[str, Any]) -> CommandRequest:
    """What a refused slash command said, made storable, for the audit row of the refusal."""
    return CommandRequest(actor=Actor(UserId(_name(body.get("user_id"))), _name(body.get("user_name"))),
                          channel_id=ChannelId(_name(body.get("channel_id"))),
                          text=str(storable(body.get("text") if isinstance(body.get("text"), str) else "")),
                          response_url=body["response_url"] if isinstance(body.get("response_url"), str) else "")


@dataclass(frozen=True, kw_only=True)
class Click:
    """A button click: who, on which message (the card), and the value the button carried."""

    actor: Actor
    channel_id: str
    message_ts: str
    value: str  # not yet checked: see ``request_id``


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def click(body: dict[str, Any], action: dict[str, Any]) -> Click:
    user, channel, container, message = (_obj(body.get(k)) for k in ("user", "channel", "container", "message"))
    actor = Actor(UserId(_field(user.get("id"), _USER_ID, "user id")), _name(user.get("username") or user.get("name")))
    channel_id = _field(channel.get("id") or container.get("channel_id"), _CHANNEL_ID, "channel id")
    ts = _field(container.get("message_ts") or message.get("ts"), _MESSAGE_TS, "message ts")
    value = action.get("value")
    return Click(actor=actor, channel_id=channel_id, message_ts=ts, value=value if isinstance(value, str) else "")


@dataclass(frozen=True, kw_only=True)
class HomeClick:
    """A button click in a Home tab: who, in which view (its id and type, as Slack sent them)."""

    actor: Actor
    view_id: str
    view_type: str
    value: str


_VIEW_ID = re.compile(r"V[A-Z0-9]{1,30}")


def home_click(body: dict[str, Any], action: dict[str, Any]) -> HomeClick:
    user, view = _obj(body.get("user")), _obj(body.get("view"))
    actor = Actor(UserId(_field(user.get("id"), _USER_ID, "user id")), _name(user.get("username") or user.get("name")))
    view_id = view.get("id")
    value = action.get("value")
    return HomeClick(actor=actor, view_id=view_id if isinstance(view_id, str) and _VIEW_ID.fullmatch(view_id) else "",
                     view_type=_name(view.get("type")), value=value if isinstance(value, str) else "")


def home_user(event: dict[str, Any]) -> str | None:
    """The user of an ``app_home_opened`` event on the Home tab (None: another tab, or not a user id)."""
    user = event.get("user")
    if event.get("tab") != "home" or not isinstance(user, str) or not _USER_ID.fullmatch(user):
        return None
    return user


def click_user(body: dict[str, Any]) -> tuple[str, str]:
    """Best effort (user id, channel id) of a click that failed the checks, to answer it privately when possible."""
    uid, cid = _obj(body.get("user")).get("id"), _obj(body.get("channel")).get("id")
    return (uid if isinstance(uid, str) and _USER_ID.fullmatch(uid) else "",
            cid if isinstance(cid, str) and _CHANNEL_ID.fullmatch(cid) else "")


def shape_problem(body: Any) -> str | None:
    """None if ``body`` (a parsed request body) has the shape of a Slack slash command or
    interactivity payload opsbot handles; else what is wrong. Checked before Bolt dispatches, so a
    signed but malformed payload is a 400, not an exception inside Bolt's middleware."""
    if not isinstance(body, dict):
        return "the body is not a JSON object or form"
    if "command" in body:
        return None if all(isinstance(body.get(k, ""), str) for k in ("command", "text", "user_id", "channel_id")) \
            else "a slash command's fields must be strings"
    kind = body.get("type")
    if not isinstance(kind, str):
        return "neither a slash command nor an interactivity payload"
    if kind == "block_actions":
        actions = body.get("actions")
        if not isinstance(actions, list) or not actions or not all(isinstance(a, dict) and isinstance(a.get("action_id"), str)
                                                                    for a in actions):
            return "block_actions without a list of actions"
        if not isinstance(body.get("user"), dict):
            return "block_actions without a user"
    return None


@dataclass(frozen=True, kw_only=True)
class DenySubmission:
    """The Deny dialog submitted: who, for which request and card (from the dialog's metadata, which
    opsbot wrote when it opened the dialog for that person), and the reason as typed (not checked)."""

    actor: Actor
    request_id: str
    channel_id: str
    message_ts: str
    reason: str


def deny_submission(body: dict[str, Any]) -> DenySubmission:
    """A ``view_submission`` of the Deny dialog. MalformedPayload when its ids are not Slack's or
    opsbot's, or when the dialog was opened for someone else."""
    user, view = _obj(body.get("user")), _obj(body.get("view"))
    actor = Actor(UserId(_field(user.get("id"), _USER_ID, "user id")), _name(user.get("username") or user.get("name")))
    try:
        meta = json.loads(view.get("private_metadata") or "")
    except (TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("r"), str) or not re.fullmatch(REQUEST_ID_PATTERN, meta["r"]):
        raise MalformedPayload("this dialog does not name an opsbot request; nothing was counted.")
    channel = _field(meta.get("c"), _CHANNEL_ID, "channel id")
    ts = _field(meta.get("t"), _MESSAGE_TS, "message ts")
    if meta.get("u") != actor.user_id:
        raise MalformedPayload("this dialog was opened by someone else; nothing was counted. Click Deny on the card yourself.")
    block = _obj(_obj(_obj(view.get("state")).get("values")).get("reason")).get("reason")
    reason = _obj(block).get("value")
    return DenySubmission(actor=actor, request_id=meta["r"], channel_id=channel, message_ts=ts,
                          reason=reason if isinstance(reason, str) else "")
