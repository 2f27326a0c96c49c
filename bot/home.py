"""The app's Home tab (issue 14): what the person opening it has open, what they may approve (with
an Approve button), and the last actions in the channels they are in. Published (views.publish) on
each ``app_home_opened``, and again after a click in it, so it is never older than the last look.

Each section is read on its own: when opsbot's database, Slack or the user-group lookup cannot be
read, that section says what is unavailable and the rest is still shown; the tab never fails to
open because one backend is down.

Approve from the Home tab goes through ``Approvals.click`` like a click on the card (eligibility,
quorum, one vote per person, all in one locked transaction). A card click is checked against the
card's message; a Home tab click instead against the view: it must be the Home tab opsbot last
published for the person clicking (``home_views``, migration 012), else it is refused as forged and
recorded. Deny stays on the card (an "Open card" link): denying asks for a reason there.

"Your channels": the channels of the newest ``SCANNED`` actions (and ``slack.allowed_channels``),
of which those the person is a member of (conversations.members, ``MAX_CHANNELS`` channels at most,
the most recently active first); without that scope or when Slack fails, the section says so rather than show
activity from channels the person may not see.

Opening the Home tab is recorded as a read (not posted to the audit channel): it shows requests and
actions, as `/ops pending` does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bot.adapters.store import STATE_DATABASE, Store
from bot.approvals import Approvals
from bot.audit import Audit
from bot.config import Config
from bot.domain import REQUEST_ID_PATTERN, SYSTEM, Actor, OpsRequest
from bot.errors import BackendUnavailable, OpsbotError
from bot.messages import mrkdwn
from bot.ports import Chat

log = logging.getLogger(__name__)

HOME_APPROVE = "opsbot_home_approve"
HOME_OPEN_CARD = "opsbot_home_open_card"  # a link button: Slack still sends the click, which is only acked
MAX_CHANNELS = 10
MAX_ITEMS = 10
RECENT = 10
SCANNED = 200  # action rows read to find the viewer's channels' last ones
MEMBERS_LIMIT = 5000
ACTION_EVENTS = ("requested", "approved", "denied", "succeeded", "failed", "stale", "unknown", "expired", "cancelled",
                 "break_glass", "break_glass_reviewed")


class Home:
    def __init__(self, *, config: Config, store: Store, audit: Audit, chat: Chat, approvals: Approvals,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.config, self.store, self.audit, self.chat, self.approvals, self.clock = config, store, audit, chat, approvals, clock

    async def opened(self, actor: Actor, *, notice: str = "") -> dict[str, Any]:
        """Read, render and publish ``actor``'s Home tab; returns the view (published or not)."""
        problems: list[str] = []
        mine: list[OpsRequest] = []
        approvable: list[OpsRequest] = []
        recent: list[dict[str, Any]] = []
        db_down = False
        try:
            mine = await self.store.open_requests_by(actor.user_id, limit=MAX_ITEMS)
        except BackendUnavailable as exc:
            # opsbot's database is down: every section needs it, and each would wait out the pool again.
            db_down = exc.backend == STATE_DATABASE
            if db_down:
                self.audit.database_down(str(exc))
            problems.append(f"your open requests, what you may approve and the last actions: {exc}")
        else:
            try:
                approvable = (await self.approvals.pending_for(await self.approvals.with_groups(actor)))[:MAX_ITEMS]
            except BackendUnavailable as exc:
                problems.append(f"what you may approve: {exc}")
            recent, recent_problem = await self._recent(actor)
            if recent_problem:
                problems.append(f"the last actions in your channels: {recent_problem}")
        links: dict[str, str | None] = {str(r.id): await self._link(r) for r in [*mine, *approvable]}
        view = home_view(actor=actor, mine=mine, approvable=approvable, recent=recent, links=links, problems=problems,
                         notice=notice, now=self.clock())
        published = ""
        try:
            published = await self.chat.publish_home(user_id=actor.user_id, view=view)
        except OpsbotError as exc:
            log.warning("could not publish %s's Home tab: %s", actor.user_id, exc)
        if published and not db_down:  # (else its Approve buttons are refused, and it has none)
            try:
                await self.store.remember_home_view(actor.user_id, published)
            except BackendUnavailable as exc:  # its Approve buttons will be refused until the next open: say why then
                log.warning("could not remember %s's Home tab (%s): its clicks will be refused", actor.user_id, exc)
        try:
            await self.audit.record("read", actor=actor, text="(Home tab)", post=False,
                                    result={"home": {"open": [r.id for r in mine], "may_approve": [r.id for r in approvable],
                                                     "recent": len(recent), "unavailable": problems, "published": bool(published)}})
        except BackendUnavailable as exc:
            log.warning("Home tab of %s not recorded: %s", actor.user_id, exc)
        return view

    async def approve(self, actor: Actor, *, request_id: str, view_id: str, view_type: str) -> None:
        """An Approve click in a Home tab (``view_id``/``view_type`` as Slack sent them)."""
        checked = view_id if view_type == "home" and view_id else f"not a Home tab: {view_type[:20]}:{view_id[:40]}"
        channel = ""
        try:
            request = await self.store.get(request_id) if re.fullmatch(REQUEST_ID_PATTERN, request_id) else None
            channel = (request.card_channel or request.channel_id) if request else ""
            result = await self.approvals.click(request_id, actor, "approve", channel_id=channel, message_ts="", home_view=checked)
        except BackendUnavailable as exc:
            if exc.backend == STATE_DATABASE:
                self.audit.database_down(str(exc))
            try:
                await self.audit.record("vote_refused", actor=actor, channel_id=channel, text="",
                                        result={"why": "backend_unavailable", "backend": exc.backend, "error": str(exc),
                                                "request_id_given": request_id[:64], "from": "home"})
            except BackendUnavailable:
                log.error("Home tab click by %s on %r not recorded: %s", actor.user_id, request_id[:64], exc)
            await self.opened(actor, notice=f":x: Your click was not counted: {exc}. Nothing changed; click again when it is back.")
            return
        words = {"approved": f":white_check_mark: You approved `{request_id}`: it is approved and queued.",
                 "counted": f":white_check_mark: Your approval of `{request_id}` is counted; more are needed."}
        await self.opened(actor, notice=words.get(result.outcome) or f":x: {result.message}")

    async def _recent(self, actor: Actor) -> tuple[list[dict[str, Any]], str]:
        """The last actions in channels ``actor`` is a member of: the newest ``SCANNED`` action rows,
        their channels (and the allowed channels) checked for membership, ``MAX_CHANNELS`` at most."""
        try:
            rows = await self.audit.log.recent(events=ACTION_EVENTS, limit=SCANNED)
        except BackendUnavailable as exc:
            return [], str(exc)
        candidates = list(dict.fromkeys([*self.config.slack.allowed_channels, *(str(r["channel_id"]) for r in rows)]))
        theirs: set[str] = set()
        try:
            for channel in [c for c in candidates if c][:MAX_CHANNELS]:
                if actor.user_id in await self.chat.channel_members(channel, limit=MEMBERS_LIMIT):
                    theirs.add(channel)
        except OpsbotError as exc:
            return [], f"could not check which channels you are in ({exc})"
        return [r for r in rows if r["channel_id"] in theirs][:RECENT], ""

    async def _link(self, request: OpsRequest) -> str | None:
        if not (request.card_channel and request.card_ts):
            return None
        try:
            return await self.chat.permalink(channel_id=request.card_channel, ts=request.card_ts)
        except OpsbotError:
            return None


# ------------------------------------------------------------------ the view (Block Kit)

def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def _request_words(r: OpsRequest) -> str:
    got = sum(a.decision == "approve" for a in r.approvals)
    where = f" in <#{r.card_channel}>" if r.card_channel else ""
    state = r.state.value.replace("_", " ")
    votes = f", {got}/{r.approvals_required} approvals" if r.state.value == "pending_approval" else ""
    return f"`{r.id}` {mrkdwn(r.summary)} — *{state}*{votes}{where}"


def home_view(*, actor: Actor, mine: list[OpsRequest], approvable: list[OpsRequest], recent: list[dict[str, Any]],
              links: dict[str, str | None], problems: list[str], notice: str, now: datetime) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": "opsbot"}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"As of {now:%H:%M:%S} UTC; it is refreshed each time you open it."}]},
    ]
    if notice:
        blocks.append(_section(notice))
    if problems:
        blocks.append(_section(":warning: *Unavailable right now*\n" + "\n".join(f"• {mrkdwn(p)}" for p in problems)))
    blocks += [{"type": "divider"}, _section("*Your open requests*")]
    for r in mine:
        block = _section(_request_words(r) + (f", expires {r.expires_at:%H:%M} UTC" if r.state.value == "pending_approval" else ""))
        if links.get(r.id):
            block["accessory"] = {"type": "button", "action_id": HOME_OPEN_CARD, "text": {"type": "plain_text", "text": "Open card"},
                                  "url": links[r.id], "value": r.id}
        blocks.append(block)
    if not mine:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": "None."}]})
    blocks += [{"type": "divider"}, _section("*Waiting for your approval*")]
    for r in approvable:
        blocks.append(_section(f"{_request_words(r)}\nby {r.requester.mention()}, expires {r.expires_at:%H:%M} UTC"))
        elements: list[dict[str, Any]] = [{"type": "button", "action_id": HOME_APPROVE, "style": "primary", "value": r.id,
                                           "text": {"type": "plain_text", "text": "Approve"}}]
        if links.get(r.id):
            elements.append({"type": "button", "action_id": HOME_OPEN_CARD, "value": r.id, "url": links[r.id],
                             "text": {"type": "plain_text", "text": "Open card (to deny)"}})
        blocks.append({"type": "actions", "block_id": f"opsbot_home:{r.id}", "elements": elements})
    if not approvable:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": "Nothing is waiting for you."}]})
    blocks += [{"type": "divider"}, _section("*Last actions in your channels*")]
    lines = []
    for row in recent:
        plan = row.get("plan") or {}
        who = "opsbot" if row["actor_id"] == SYSTEM.user_id else mrkdwn(str(row.get("actor_name") or row["actor_id"]))
        what = mrkdwn(str(plan.get("summary") or row.get("command_text") or ""))[:150]
        req = f" `{row['request_id']}`" if row.get("request_id") else ""
        lines.append(f"`{row['at']:%m-%d %H:%M}` *{row['event']}* {who}: {what}{req} in <#{row['channel_id']}>")
    blocks.append(_section("\n".join(lines) or "_Nothing yet._"))
    return {"type": "home", "callback_id": "opsbot_home", "blocks": blocks}
