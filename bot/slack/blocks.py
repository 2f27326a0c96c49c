"""Block Kit for the approval card. Words come from bot/messages.py; every piece of text that came
from a person or a backend goes through ``mrkdwn``/``code`` there."""

from __future__ import annotations

from typing import Any

from bot.domain import OpsRequest, RequestState
from bot.messages import approvals_line, code, mrkdwn, request_status
from bot.reminders import mentions

APPROVE, DENY, ACKNOWLEDGE = "opsbot_approve", "opsbot_deny", "opsbot_acknowledge"
CANCEL, AGAIN, DENY_VIEW = "opsbot_cancel", "opsbot_request_again", "opsbot_deny_reason"
DENY_REASON_MAX = 500  # characters of a deny's reason (the dialog's input, checked again on submission)
AGAIN_STATES = (RequestState.DENIED, RequestState.EXPIRED, RequestState.STALE)
UNDO = "opsbot_undo"  # value: the request id to undo (bot/undo.py); the click is `/ops undo <id>` by the clicker


def _text(s: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": s[:2900]}


def card_fallback(request: OpsRequest) -> str:
    return f"opsbot request {request.id}: {mrkdwn(request.summary)} — {request_status(request)}"


def card_blocks(request: OpsRequest) -> list[dict[str, Any]]:
    plan = request.plan
    lines = [undo_of_line(request) + f"*{mrkdwn(plan.get('summary', request.text))}*",
             f"target: {code(plan.get('target_label', plan.get('target')))} · environment: *{mrkdwn(plan.get('environment'))}*"]
    lines += [f"• {mrkdwn(d)}" for d in plan.get("details") or []]
    context = [f"requested by {request.requester.mention()}: {code('/ops ' + request.text)}"]
    if request.audit_permalink:
        context.append(f"<{request.audit_permalink}|audit record>")
    if request.undo_of_link:
        context.append(f"<{request.undo_of_link}|card of the request it undoes>")
    if request.reason:
        context.append(f"reason: {mrkdwn(request.reason)}")
    if request.rule:
        context.append(f"policy: {mrkdwn(request.rule)}")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": _text(f"*opsbot request* `{request.id}` — {request_status(request)}")},
    ]
    if request.break_glass:
        blocks.append({"type": "section", "text": _text(
            f":rotating_light: *BREAK-GLASS* by {request.requester.mention()}: {mrkdwn(request.break_glass)}")})
    blocks += [
        {"type": "section", "text": _text("\n".join(lines))},
        {"type": "context", "elements": [_text(" · ".join(context))]},
    ]
    if request.approvals_required:
        blocks.append({"type": "context", "elements": [_text(approvals_line(request))]})
    if request.state is RequestState.PENDING_APPROVAL:
        expires = int(request.expires_at.timestamp())
        blocks.append({
            "type": "actions",
            "block_id": f"opsbot_vote:{request.id}",
            "elements": [
                {"type": "button", "action_id": APPROVE, "style": "primary", "value": request.id,
                 "text": {"type": "plain_text", "text": "Approve"}},
                # Deny opens a dialog asking for the reason (bot/slack/app.py): it is the confirmation.
                {"type": "button", "action_id": DENY, "style": "danger", "value": request.id,
                 "text": {"type": "plain_text", "text": "Deny"}},
                {"type": "button", "action_id": CANCEL, "value": request.id,
                 "text": {"type": "plain_text", "text": "Cancel (requester)"}},
            ],
        })
        who = f" ({mentions(request.approvers_named)})" if request.approvers_named else ""
        blocks.append({"type": "context", "elements": [_text(
            f"approvals from {', '.join(request.approver_roles)}{who}; the requester's own click does not count · "
            f"expires <!date^{expires}^{{time}}|{request.expires_at:%H:%M} UTC>")]})
        if request.escalated_at:
            blocks.append({"type": "context", "elements": [_text(
                f":arrow_double_up: escalated to {', '.join(request.escalate_to)} "
                f"<!date^{int(request.escalated_at.timestamp())}^{{time}}|{request.escalated_at:%H:%M} UTC>: they may approve too")]})
    elif request.state.final and (request.error or request.result):
        outcome = request.error or (request.result or {}).get("message", "")
        blocks.append({"type": "context", "elements": [_text(mrkdwn(outcome))]})
        blocks += undo_blocks(request)
    if request.state is RequestState.DENIED and request.deny_reason:
        blocks.append({"type": "context", "elements": [_text(f"reason for denying: {mrkdwn(request.deny_reason)}")]})
    if request.state in AGAIN_STATES:
        blocks.append({"type": "actions", "block_id": f"opsbot_again:{request.id}", "elements": [
            {"type": "button", "action_id": AGAIN, "value": request.id,
             "text": {"type": "plain_text", "text": "Request again"}}]})
    if request.review_state == "needed":
        blocks.append({"type": "actions", "block_id": f"opsbot_review:{request.id}", "elements": [
            {"type": "button", "action_id": ACKNOWLEDGE, "value": request.id, "style": "primary",
             "text": {"type": "plain_text", "text": "Acknowledge (review)"}}]})
        blocks.append({"type": "context", "elements": [_text(
            f"ran without approval (break-glass); {', '.join(request.approver_roles)}"
            f"{f' ({mentions(request.approvers_named)})' if request.approvers_named else ''} must review it")]})
    elif request.review_state == "acknowledged":
        blocks.append({"type": "context", "elements": [_text(f"break-glass reviewed by <@{request.reviewed_by}>")]})
    return blocks


def undo_of_line(request: OpsRequest) -> str:
    """The start of an undo's summary: "Undo of `r-…` (its card):"."""
    if not request.undo_of:
        return ""
    return f":leftwards_arrow_with_hook: Undo of `{request.undo_of}`: "


def undo_blocks(request: OpsRequest) -> list[dict[str, Any]]:
    """A succeeded request's Undo button, or why it has none (``result.undo``, set by the worker)."""
    offer = (request.result or {}).get("undo") if request.state is RequestState.SUCCEEDED else None
    if not isinstance(offer, dict):
        return []
    if not offer.get("offered"):
        return [{"type": "context", "elements": [_text(f"No undo: {mrkdwn(offer.get('why') or 'it has no safe inverse')}.")]}]
    return [undo_button(request.id, f"Requests {mrkdwn(offer.get('why') or 'its inverse')} (undo of `{request.id}`), with "
                                    "the same approvals as any request.")]


def undo_button(request_id: str, explain: str = "") -> dict[str, Any]:
    """The actions block with the Undo button of ``request_id`` (its click: `/ops undo <id>` by the clicker)."""
    return {"type": "actions", "block_id": f"opsbot_undo:{request_id}", "elements": [
        {"type": "button", "action_id": UNDO, "value": request_id, "text": {"type": "plain_text", "text": "Undo"},
         "confirm": {"title": {"type": "plain_text", "text": "Undo this change?"},
                     "text": _text(explain or f"Requests the inverse of `{request_id}`, with the same approvals as any request."),
                     "confirm": {"type": "plain_text", "text": "Request undo"},
                     "deny": {"type": "plain_text", "text": "Cancel"}}}]}


def message_with_undo(text: str, request_id: str) -> list[dict[str, Any]]:
    """A thread reply (already mrkdwn-safe) with the Undo button of its request under it."""
    return [{"type": "section", "text": _text(text)}, undo_button(request_id)]


def deny_view(request: OpsRequest, *, channel_id: str, message_ts: str, user_id: str) -> dict[str, Any]:
    """The Deny dialog: the reason is required and bounded. ``private_metadata`` names the request,
    the card it was opened from and who opened it; the submission is checked against all of them."""
    import json

    meta = json.dumps({"r": request.id, "c": channel_id, "t": message_ts, "u": user_id}, separators=(",", ":"))
    return {
        "type": "modal", "callback_id": DENY_VIEW, "private_metadata": meta,
        "title": {"type": "plain_text", "text": "Deny request"},
        "submit": {"type": "plain_text", "text": "Deny"},
        "close": {"type": "plain_text", "text": "Back"},
        "blocks": [
            {"type": "section", "text": _text(f"`{request.id}`: *{mrkdwn(request.summary)}* — requested by "
                                              f"{request.requester.mention()}")},
            {"type": "input", "block_id": "reason", "label": {"type": "plain_text", "text": "Why deny it?"},
             "element": {"type": "plain_text_input", "action_id": "reason", "multiline": True,
                         "min_length": 1, "max_length": DENY_REASON_MAX}},
        ],
    }
