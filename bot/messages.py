"""The words opsbot says, in one place (the Block Kit layout lives in bot/slack/blocks.py)."""

from __future__ import annotations

import re
from typing import Any

from bot.domain import OpsRequest, RequestState

_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")
_SLACK_ID = re.compile(r"[A-Z][A-Z0-9]{1,20}")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, in the singular for 1 and the plural otherwise: ``plural(1, "approval")``
    is "1 approval", ``plural(3, "query")`` "3 queries", ``plural(2, "person", "people")`` "2 people"."""
    if n == 1:
        return f"1 {word}"
    if many is None:
        if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
            many = word[:-1] + "ies"
        elif word.endswith(("s", "sh", "ch", "x")):
            many = word + "es"
        else:
            many = word + "s"
    return f"{n:,} {many}"


def busy_text(in_flight: int, retry_after: int) -> str:
    """The answer to a command opsbot had no room for (bot/pipeline.py ``Admission``): honest about
    why (not a backend down), what happened (nothing) and when to try again."""
    return (f":hourglass: opsbot is busy ({plural(in_flight, 'command')} in flight), try again in {retry_after} s. "
            "Nothing was done and nothing is queued: send the command again then. opsbot's backends are fine; "
            "it is taking no more work at once than it can finish.")


def mrkdwn(text: Any) -> str:
    """User-supplied text (a --reason, a command, an error that quotes them) made inert in Slack
    mrkdwn, at render time only (what is parsed and stored stays as typed): ``&``, ``<`` and ``>``
    escaped as Slack asks (api.slack.com/reference/surfaces/formatting#escaping), so it cannot
    become a mention (``<!channel>``), a link or a date; line breaks become spaces, so it cannot
    start a line of its own (an audit line is one line, `` `#N` … hash `…` ``)."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _LINE_BREAKS.sub(" ", s)


def code(text: Any) -> str:
    """User text shown as inline code (a command): escaped as ``mrkdwn``; a backtick, which would
    end the code span (mrkdwn cannot escape it), is shown as ˋ."""
    return "`" + mrkdwn(text).replace("`", "ˋ") + "`"


def user_ref(user_id: Any) -> str:
    """A mention for an id that passed the payload checks; anything else (the actor of a refused,
    malformed payload) as code."""
    return f"<@{user_id}>" if isinstance(user_id, str) and _SLACK_ID.fullmatch(user_id) else code(user_id)


def channel_ref(channel_id: Any) -> str:
    return f"<#{channel_id}>" if isinstance(channel_id, str) and _SLACK_ID.fullmatch(channel_id) else code(channel_id)


def usergroup_problems(problems: dict[str, str], roles_naming: dict[str, list[str]]) -> list[str]:
    """What to tell a person about configured Slack user groups that grant nothing because the
    configuration is wrong (``problems``: group → Slack's error; ``roles_naming``: group → the roles
    whose ``usergroups`` name it). One line per unknown group; one line for an app-wide problem."""
    def keys(groups: list[str]) -> str:
        roles = sorted({r for g in groups for r in roles_naming.get(g, [])}) or ["<role>"]
        return " and ".join(f"`roles.{r}.usergroups`" for r in roles)

    lines = []
    unknown = sorted(g for g, e in problems.items() if e == "no_such_subteam")
    for group in unknown:
        lines.append(f"The policy names Slack user group {group}, which does not exist in this workspace; roles from it are "
                     f"not granted. Ask the platform team to fix {keys([group])} in the opsbot config.")
    scope = sorted(g for g, e in problems.items() if e == "missing_scope")
    if scope:
        lines.append(f"opsbot's Slack app lacks the `usergroups:read` scope, so it cannot see who is in the Slack user "
                     f"{'group' if len(scope) == 1 else 'groups'} {', '.join(scope)}; roles from "
                     f"{'it' if len(scope) == 1 else 'them'} are not granted. Ask the platform team to add the scope to "
                     "the opsbot app and reinstall it.")
    plan = sorted(g for g, e in problems.items() if e == "plan_upgrade_required")
    if plan:
        lines.append(f"This Slack workspace's plan has no user groups, so roles from {', '.join(plan)} are not granted. "
                     f"Ask the platform team to name people in `roles.<role>.users` instead of {keys(plan)}.")
    other = sorted(g for g, e in problems.items() if e not in ("no_such_subteam", "missing_scope", "plan_upgrade_required"))
    for group in other:
        lines.append(f"Slack user group {group} cannot be used ({mrkdwn(problems[group])}); roles from it are not granted. "
                     f"Ask the platform team to check {keys([group])} in the opsbot config.")
    return lines


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
    "refused": "refused",
    "busy": "refused: opsbot busy",
    "error": "internal error",
    "dry_run": "dry run",
    "malformed": "malformed request refused",
    "vote_refused": "click refused",
    "review_refused": "review refused",
    "cancel_refused": "cancel refused",
    "followed": "change complete (rollout/job followed to its end)",
    "follow_failed": ":rotating_light: CHANGE DID NOT COMPLETE (rollout or job failed after it was applied)",
    # A flag action's `revert_after` (commands/actions/flag.py, bot/worker.py Reverts)
    "revert_announced": "auto-revert announced",
    "reverted": "auto-reverted (old value put back)",
    "revert_skipped": "auto-revert skipped (the flag had been changed since)",
    "revert_delayed": "auto-revert delayed (backend unavailable; will retry)",
    "revert_failed": ":rotating_light: AUTO-REVERT FAILED",
    "revert_superseded": "auto-revert cancelled (a later request set the value back)",
    # Undo (bot/undo.py): on the original's trail
    "undo_requested": "undo requested",
    "undo_refused": "undo refused",
    # Approvers who get told (bot/reminders.py, bot/slack/approvers.py)
    "reminded": "approvers reminded (direct message)",
    "escalated": "escalated (direct message; they may approve too)",
    "review_reminded": "break-glass reviewers reminded (direct message)",
    "requested_again": "requested again (Request again button)",
    "again_refused": "request again refused",
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


def _row_about(row: dict[str, Any]) -> tuple[str, str, str]:
    """An audit row's parts as the channel shows them: what it is about (the plan's summary, or the
    command typed), its environment, and its outcome (message, error or reason), all escaped."""
    plan = row.get("plan") or {}
    result = row.get("result") or {}
    what = mrkdwn(plan["summary"]) if plan.get("summary") else code(f"/ops {row.get('command_text') or ''}")
    where = f" [{mrkdwn(plan['environment'])}]" if plan.get("environment") else ""
    extra = ""
    if result.get("message"):
        extra = f" — {mrkdwn(result['message'])}"
    elif result.get("error"):
        extra = f" — {mrkdwn(result['error'])}"
    elif result.get("reason"):
        extra = f" — reason: {mrkdwn(result['reason'])}"
    return what, where, extra


def audit_line(row: dict[str, Any]) -> str:
    """One audit row as posted: a step in a request's thread, or a compact line of its own for
    attempts that never became a request (invalid, denied by policy). The full row hash is in it, so
    a copy of the channel is evidence `opsbot audit verify --against-channel` can check."""
    what, where, extra = _row_about(row)
    req = f" · request {code(row['request_id'])}" if row.get("request_id") else ""
    channel = f" in {channel_ref(row['channel_id'])}" if row.get("channel_id") and not row.get("request_id") else ""
    who = "opsbot" if row["actor_id"] == "opsbot" else user_ref(row["actor_id"])
    return (f"`#{row['seq']}` *{EVENT_LABEL.get(row['event'], row['event'])}* by {who}{channel}: "
            f"{what}{where}{req}{extra} · hash `{row['hash']}`")


# Under a backlog (bot/audit.py), the rows of one request in one message become one line: every row's
# seq with the first HASH_PREFIX hex digits of its hash at the start, the last row's full hash at the
# end. The hash chain makes the full hash evidence for every row before it (a rewritten row changes
# every hash after it), and the prefixes say which row differs. A line reads
#   `#12:0123456789abcdef #15:… #19` request `r-…` svc: 3 → 4 replicas [production]: *requested* by <@U1> · … · hash `…`
HASH_PREFIX = 16
_PREFIX = f"#\\d+:[0-9a-f]{{{HASH_PREFIX}}}"
COMPACT_HEAD = re.compile(rf"^`({_PREFIX}(?: {_PREFIX})*) #(\d+)` .* · hash `([0-9a-f]{{64}})`$")


def _audit_step(row: dict[str, Any]) -> tuple[str, str]:
    """(what the row is about, its step: event, actor, outcome) as ``audit_line`` writes them."""
    what, where, extra = _row_about(row)
    who = "" if row["actor_id"] == "opsbot" else f" by {user_ref(row['actor_id'])}"
    return what + where, f"*{EVENT_LABEL.get(row['event'], row['event'])}*{who}{extra}"


def audit_request_line(rows: list[dict[str, Any]]) -> str:
    """Several rows of one request (seq order, all with its ``request_id``) as one line: what it is
    about once, then each step (a step with no "by" is opsbot's own; one about something else than
    the first says so). ``audit_line`` for a single row."""
    if len(rows) == 1:
        return audit_line(rows[0])
    head = " ".join(f"#{r['seq']}:{str(r['hash'])[:HASH_PREFIX]}" for r in rows[:-1]) + f" #{rows[-1]['seq']}"
    about, _ = _audit_step(rows[0])
    steps = []
    for r in rows:
        what, step = _audit_step(r)
        steps.append(step if what == about else f"{step} ({what})")
    return (f"`{head}` request {code(rows[0]['request_id'])} {about}: " + " · ".join(steps)
            + f" · hash `{rows[-1]['hash']}`")


def posted_hashes(line: str) -> list[tuple[int, str]]:
    """The (seq, hash) pairs an audit-channel line shows, the hash whole or its first HASH_PREFIX
    digits: an ``audit_line``, an ``audit_request_line`` or a headline's last record. Only the ends of
    a line are read: user text, in the middle, cannot add or change a pair (it holds no line break)."""
    if m := COMPACT_HEAD.match(line):
        pairs = [(int(seq), digest) for seq, digest in (item[1:].split(":") for item in m.group(1).split(" "))]
        return [*pairs, (int(m.group(2)), m.group(3))]
    if m := _ONE_ROW.match(line):
        return [(int(m.group(1) or m.group(2)), m.group(3))]
    return []


_ONE_ROW = re.compile(r"^(?:`#(\d+)` .* · hash |last record `#(\d+)` hash )`([0-9a-f]{64})`$")


def audit_headline(request: OpsRequest, last: dict[str, Any], card_link: str | None) -> str:
    """The one message per request in the audit channel: who, what, where, state; updated as it moves."""
    plan = {**request.plan, "summary": mrkdwn(request.plan["summary"]) if request.plan.get("summary") else code(request.text)}
    card = f" · <{card_link}|approval card>" if card_link else ""
    glass = " :rotating_light: *BREAK-GLASS*" if request.break_glass else ""
    return (f"*{request.command}* `{request.id}`{glass} — {plan.get('summary', request.text)} [{plan.get('environment')}]\n"
            f"by {request.requester.mention()} in <#{request.channel_id}> · state: {STATE_LABEL[request.state]}"
            f"{' · :rotating_light: *its rollout/job failed*' if last.get('event') == 'follow_failed' else ''}{card}\n"
            f"last record `#{last['seq']}` hash `{last['hash']}`")


def request_status(request: OpsRequest) -> str:
    return STATE_LABEL[request.state]


def thread_result(request: OpsRequest) -> str:
    if request.state is RequestState.SUCCEEDED:
        undo = (request.result or {}).get("undo")
        hint = f" Undo: {code('/ops undo ' + request.id)} (or Undo on the card)." if isinstance(undo, dict) and undo.get("offered") else ""
        return f":large_green_circle: Done: {mrkdwn((request.result or {}).get('message', ''))}{hint}"
    if request.state is RequestState.FAILED:
        return f":red_circle: Failed: {mrkdwn(request.error)}"
    if request.state is RequestState.STALE:
        return (f":warning: Not run: {mrkdwn(request.error)} What was approved no longer matches the target. "
                f"Check it and request again: {code('/ops ' + request.text)}")
    if request.state is RequestState.UNKNOWN:
        return (f":grey_question: Outcome unknown: {mrkdwn(request.error or 'the worker running this was lost mid-action')}. "
                "It was not retried: check the target's state by hand before doing anything else.")
    return request_status(request)
