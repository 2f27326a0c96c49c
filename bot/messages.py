"""The words opsbot says, in one place (the Block Kit layout lives in bot/slack/blocks.py)."""

from __future__ import annotations

from typing import Any

from bot.domain import OpsRequest, RequestState

STATE_LABEL = {
    RequestState.PENDING_APPROVAL: ":hourglass_flowing_sand: waiting for approval",
    RequestState.APPROVED: ":white_check_mark: approved, queued",
    RequestState.RUNNING: ":gear: running",
    RequestState.SUCCEEDED: ":large_green_circle: succeeded",
    RequestState.FAILED: ":red_circle: failed",
    RequestState.DENIED: ":no_entry: denied",
    RequestState.EXPIRED: ":alarm_clock: expired",
    RequestState.CANCELLED: ":heavy_multiplication_x: cancelled",
    RequestState.STALE: ":warning: stale (target changed after approval)",
    RequestState.UNKNOWN: ":grey_question: unknown (worker lost mid-action; check the target)",
}

EVENT_LABEL = {
    "requested": "requested",
    "invalid": "invalid command",
    "policy_denied": "denied by policy",
    "approval_given": "approval given",
    "approved": "approved",
    "denied": "denied",
    "expired": "expired",
    "started": "started",
    "succeeded": "succeeded",
    "failed": "failed",
    "stale": "stale",
    "unknown": "unknown outcome",
    "read": "read",
    "cancelled": "cancelled",
    "break_glass": ":rotating_light: BREAK-GLASS (ran without approval)",
    "break_glass_reviewed": "break-glass reviewed",
}


def approvals_line(request: OpsRequest) -> str:
    yes = [a.approver.mention() for a in request.approvals if a.decision == "approve"]
    no = [a.approver.mention() for a in request.approvals if a.decision == "deny"]
    parts = [f"approvals {len(yes)}/{request.approvals_required}" + (f": {', '.join(yes)}" if yes else "")]
    if request.approvals_each:
        parts.append(f"at least one from each of {', '.join(request.approvals_each)}")
    if no:
        parts.append(f"denied by {', '.join(no)}")
    return " · ".join(parts)


def audit_line(row: dict[str, Any]) -> str:
    plan = row.get("plan") or {}
    result = row.get("result") or {}
    what = plan.get("summary") or row.get("command_text") or ""
    where = f" [{plan['environment']}]" if plan.get("environment") else ""
    req = f" · request `{row['request_id']}`" if row.get("request_id") else ""
    extra = ""
    if result.get("message"):
        extra = f" — {result['message']}"
    elif result.get("error"):
        extra = f" — {result['error']}"
    return (f"`#{row['seq']}` *{EVENT_LABEL.get(row['event'], row['event'])}* by <@{row['actor_id']}>: "
            f"{what}{where}{req}{extra} · `{row['hash'][:12]}`")


def request_status(request: OpsRequest) -> str:
    return STATE_LABEL[request.state]


def thread_result(request: OpsRequest) -> str:
    if request.state is RequestState.SUCCEEDED:
        return f":large_green_circle: Done: {(request.result or {}).get('message', '')}"
    if request.state is RequestState.FAILED:
        return f":red_circle: Failed: {request.error}"
    if request.state is RequestState.STALE:
        return (f":warning: Not run: {request.error} What was approved no longer matches the target. "
                f"Check it and request again: `/ops {request.text}`")
    if request.state is RequestState.UNKNOWN:
        return (":grey_question: The worker running this was lost mid-action. It was not retried: "
                "check the target's state by hand before doing anything else.")
    return request_status(request)
