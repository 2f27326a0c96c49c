"""Approvers who get told: reminders, escalation and break-glass review reminders, by direct message.

Every replica's sweeper calls ``Reminders.run_due`` (``ActionWorker.sweep``). What is due is a row
of ``approval_reminders`` (migration 011), written when the request is opened (``schedule``):

* ``remind``: nobody acted within the rule's ``remind_after`` (default 10 min): each eligible
  approver gets a direct message with the summary and a link to the card.
* ``escalate``: still open after ``escalate_after``: the request's approver roles are widened with
  ``escalate_to`` (recorded on the row: ``approver_roles``, ``approvers_named``, ``escalated_at``),
  so those people may approve from then on (the quorum, ``count`` and ``each_of``, is unchanged), the
  card and the thread say so, and they get a direct message.
* ``review``: a break-glass run nobody acknowledged: its reviewers get a direct message, again with
  backoff (``remind_after`` × 2ⁿ, at most ``REVIEW_MAX_GAP`` apart, ``REVIEW_ROUNDS`` times) until
  someone acknowledges.

Exactly once: due rows are claimed ``CLAIM_BATCH`` at a time with one conditional UPDATE (among
replicas one gets each; a claim older than ``lease`` is taken again, so a replica lost mid-way loses
nothing). Before each message the holder renews its claim (``_hold``: a conditional UPDATE that
also returns who was told so far); if another replica has taken the row meanwhile (this one was
slower than the lease), it stops there and sends nothing more, writes no audit row, and the other
replica tells only those not told yet. Who was told is kept
in the row as each message goes out (``told``): after a failure (Slack down, Redis down so user
groups cannot be read) the row is put back unclaimed with a later ``due_at`` and the retry tells only
the rest. A message whose answer was lost (a timeout after sending) counts as told: at most once.
Each round ends in one audit row (``reminded``, ``escalated``, ``review_reminded``) naming who was told.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from bot.adapters.store import Store
from bot.audit import Audit, Permalinks
from bot.config import Config
from bot.domain import SYSTEM, OpsRequest, RequestState
from bot.errors import BackendUnavailable, DeliveryUncertain, ExecutionError, OpsbotError
from bot.messages import code, mrkdwn, plural
from bot.notices import Notices
from bot.ports import Chat, Directory

log = logging.getLogger(__name__)

REVIEW_ROUNDS = 6  # break-glass review reminders at most (then the audit trail and the card still say it is unreviewed)
REVIEW_MAX_GAP = 4 * 3600  # seconds between two review reminders at most
MAX_RETRY = 300.0  # seconds between attempts after a failure, at most
CLAIM_BATCH = 10  # rows claimed at once: each round is short next to the lease, so no claim outlives it waiting its turn
_USER = re.compile(r"[UW][A-Z0-9]{1,20}")
_GROUP = re.compile(r"S[A-Z0-9]{1,20}")
EVENTS = {"remind": "reminded", "escalate": "escalated", "review": "review_reminded"}


def approvers_named(config: Config, roles: Sequence[str], requester_id: str) -> tuple[str, ...]:
    """Who the card names as able to approve: the roles' users (never the requester) and user groups,
    each id once, in the policy's order; ids that are not Slack ids are left out (never mentioned)."""
    users: list[str] = []
    groups: list[str] = []
    for name in roles:
        role = config.roles.get(name)
        if role is None:
            continue
        users += [u for u in role.users if u != requester_id and _USER.fullmatch(u)]
        groups += [g for g in role.usergroups if _GROUP.fullmatch(g)]
    return tuple(dict.fromkeys([*groups, *users]))


def mention(named: str) -> str:
    """``S…`` → a user group handle, ``U…`` → a user mention (ids checked by ``approvers_named``)."""
    return f"<!subteam^{named}>" if named.startswith("S") else f"<@{named}>"


def mentions(named: Sequence[str], limit: int = 15) -> str:
    shown = " ".join(mention(n) for n in named[:limit])
    return shown + (f" and {len(named) - limit} more" if len(named) > limit else "")


class Reminders:
    def __init__(self, *, config: Config, store: Store, chat: Chat, audit: Audit, directory: Directory, notices: Notices,
                 permalinks: Permalinks, worker_id: str | None = None, lease: timedelta = timedelta(minutes=2),
                 retry_every: float = 30.0) -> None:
        self.config, self.store, self.chat, self.audit, self.directory, self.notices = config, store, chat, audit, directory, notices
        self.permalinks = permalinks
        self.worker_id = worker_id or f"reminders-{uuid.uuid4().hex[:12]}"
        self.lease, self.retry_every = lease, retry_every

    # ---------------------------------------------------------------- writing what will be due

    async def schedule(self, request: OpsRequest) -> None:
        """The reminder rows of a request just opened (from the row's own remind_after/escalate_after).
        A request with neither has none (every row below needs one of them): no round trip for it."""
        if request.remind_after is None and request.escalate_after is None:
            return
        async with self.store.connection() as conn:
            await conn.execute(
                """INSERT INTO approval_reminders (request_id, kind, due_at)
                   SELECT id, k.kind, created_at + make_interval(secs => k.after) FROM ops_requests r,
                     LATERAL (VALUES ('remind', CASE WHEN r.state = 'pending_approval' THEN r.remind_after END),
                                     ('escalate', CASE WHEN r.state = 'pending_approval' THEN r.escalate_after END),
                                     ('review', CASE WHEN r.review_state = 'needed' THEN r.remind_after END)) AS k (kind, after)
                   WHERE r.id = %s AND k.after IS NOT NULL
                   ON CONFLICT DO NOTHING""", (request.id,))

    # ---------------------------------------------------------------- the sweep

    async def run_due(self, now: datetime | None = None) -> int:
        """Claim what is due, ``CLAIM_BATCH`` rows at a time, and tell people; ``now`` lets tests move
        time. Returns how many rows this replica claimed."""
        claimed = 0
        while True:
            async with self.store.connection() as conn:
                rows = await (await conn.execute(
                    """UPDATE approval_reminders SET claimed_by = %(w)s, claimed_at = coalesce(%(now)s, now()), attempts = attempts + 1
                       WHERE (request_id, kind) IN (
                           SELECT request_id, kind FROM approval_reminders
                           WHERE done_at IS NULL AND due_at <= coalesce(%(now)s, now())
                             AND (claimed_by IS NULL OR claimed_at < coalesce(%(now)s, now()) - %(lease)s)
                           ORDER BY due_at LIMIT %(n)s FOR UPDATE SKIP LOCKED)
                         AND done_at IS NULL AND (claimed_by IS NULL OR claimed_at < coalesce(%(now)s, now()) - %(lease)s)
                       RETURNING *""", {"w": self.worker_id, "now": now, "lease": self.lease, "n": CLAIM_BATCH})).fetchall()
            claimed += len(rows)
            for row in rows:
                try:
                    await self._one(row, now)
                except BackendUnavailable as exc:  # opsbot's database: the row stays claimed and is taken again after the lease
                    log.warning("reminder %s/%s: %s; will try again", row["request_id"], row["kind"], exc)
                except Exception:
                    log.exception("reminder %s/%s crashed; will try again", row["request_id"], row["kind"])
                    await self._later(row, "internal error", now)
            if len(rows) < CLAIM_BATCH:
                return claimed

    async def _one(self, row: dict[str, Any], now: datetime | None) -> None:
        kind = row["kind"]
        request = await self.store.get(row["request_id"])
        assert request is not None  # a foreign key
        still = request.review_state == "needed" if kind == "review" else request.state is RequestState.PENDING_APPROVAL
        if not still:
            await self._done(row, "closed", now)
            return
        if kind == "escalate":
            request = await self._escalate(request, now)
        roles = request.escalate_to if kind == "escalate" else request.approver_roles
        try:
            people = await self._people(request, roles)
        except BackendUnavailable as exc:  # user groups could not be read (Slack or Redis): later, not on a guess
            await self._later(row, str(exc), now)
            return
        told = list(row["told"])
        link = await self.permalinks.get(request.card_channel, request.card_ts) if request.card_channel and request.card_ts else None
        text = self._text(kind, request, link, roles)
        unreachable: list[str] = []
        for user in people:
            held = await self._hold(row, now)
            if held is None:
                return  # another replica took the row (this one was slower than the lease): it tells the rest
            told = held + [u for u in told if u not in held]
            if user in told:
                continue
            try:
                await self.chat.post_message(channel_id=user, text=text)
            except DeliveryUncertain as exc:  # it may have arrived: counted as told, never sent twice
                log.warning("reminder DM to %s for %s may not have arrived: %s", user, request.id, exc)
            except ExecutionError as exc:
                if exc.temporary:
                    await self._later(row, str(exc), now)
                    return
                unreachable.append(user)  # this person cannot be messaged (deactivated, a bot…): the others still are
                log.warning("reminder DM to %s for %s refused: %s", user, request.id, exc)
            except OpsbotError as exc:  # rate-limited and the like: later, the rest of the people
                await self._later(row, str(exc), now)
                return
            told.append(user)
            if not await self._told(row, user):
                return
        held = await self._hold(row, now)  # only the holder ends the round and writes its audit row
        if held is None:
            return
        told = held + [u for u in told if u not in held]
        reached = [u for u in told if u not in unreachable]
        result: dict[str, Any] = {"told": reached, "roles": list(roles), "link": link,
                                  "message": f"told {', '.join(reached) or 'nobody (no eligible approver left)'}"}
        if unreachable:
            result["unreachable"] = unreachable
        if kind == "review":
            result["round"] = int(row["rounds"]) + 1
        await self.audit.record(EVENTS[kind], actor=SYSTEM, channel_id=request.channel_id, request_id=request.id,
                                text=request.text, plan=request.plan, result=result)
        await self._done(row, "sent" if told else "nobody", now, request=request)

    async def _people(self, request: OpsRequest, roles: Sequence[str]) -> list[str]:
        """Who may act on it now: the roles' users and user group members, not the requester, not
        anyone who already voted, in a stable order."""
        users = [u for r in roles if r in self.config.roles for u in self.config.roles[r].users]
        groups = frozenset(g for r in roles if r in self.config.roles for g in self.config.roles[r].usergroups)
        members = await self.directory.members_of(groups) if groups else frozenset()
        voted = {a.approver.user_id for a in request.approvals}
        return [u for u in dict.fromkeys([*users, *sorted(members)])
                if u != request.requester.user_id and u not in voted and _USER.fullmatch(u)]

    async def _escalate(self, request: OpsRequest, now: datetime | None) -> OpsRequest:
        """Widen who may approve (once, whichever replica gets there): recorded on the row, shown on
        the card and in the thread."""
        named = approvers_named(self.config, request.escalate_to, request.requester.user_id)
        async with self.store.connection() as conn:
            row = await (await conn.execute(
                """UPDATE ops_requests SET
                       approver_roles = approver_roles || ARRAY(SELECT x FROM unnest(escalate_to) x WHERE x <> ALL(approver_roles)),
                       approvers_named = approvers_named || ARRAY(SELECT x FROM unnest(%(named)s::text[]) x
                                                                  WHERE x <> ALL(approvers_named)),
                       escalated_at = coalesce(%(now)s, now()), card_version = card_version + 1
                   WHERE id = %(id)s AND state = 'pending_approval' AND escalated_at IS NULL RETURNING id""",
                {"id": request.id, "named": list(named), "now": now})).fetchone()
        if row is not None:
            self.notices.card_changed()
            after = round((request.escalate_after or 0) / 60)
            await self.notices.thread(request, f":arrow_double_up: Nobody approved within {plural(after, 'minute')}: escalated to "
                                               f"{', '.join(request.escalate_to)} ({mentions(named) or 'no members'}), who may "
                                               "approve it now too.")
        fresh = await self.store.get(request.id)
        assert fresh is not None
        return fresh

    def _text(self, kind: str, request: OpsRequest, link: str | None, roles: Sequence[str]) -> str:
        card = f"<{link}|Open the card>" if link else f"The card is in <#{request.card_channel or request.channel_id}>"
        what = f"*{mrkdwn(request.summary)}* ({code('/ops ' + request.text)}), request `{request.id}`"
        expires = f"<!date^{int(request.expires_at.timestamp())}^{{time}}|{request.expires_at:%H:%M} UTC>"
        got = sum(a.decision == "approve" for a in request.approvals)
        if kind == "review":
            return (f":rotating_light: A break-glass run by {request.requester.mention()} still needs a review "
                    f"({', '.join(roles)}): {what}. Reason given: {mrkdwn(request.break_glass)}. {card} and Acknowledge it.")
        lead = (f":arrow_double_up: Escalated to you ({', '.join(roles)}): nobody approved in time."
                if kind == "escalate" else f":bell: Waiting for your approval ({', '.join(roles)}).")
        return (f"{lead} {request.requester.mention()} asks: {what}; {got}/{request.approvals_required} approvals, "
                f"expires {expires}. {card} to approve or deny.")

    # ---------------------------------------------------------------- the row's bookkeeping

    async def _hold(self, row: dict[str, Any], now: datetime | None) -> list[str] | None:
        """Renew this replica's claim on the row (its lease starts again) and return who was told so
        far; None when the row is no longer this replica's (taken again after the lease, or done)."""
        async with self.store.connection() as conn:
            held = await (await conn.execute(
                "UPDATE approval_reminders SET claimed_at = coalesce(%s, now()) "
                "WHERE request_id = %s AND kind = %s AND claimed_by = %s AND done_at IS NULL RETURNING told",
                (now, row["request_id"], row["kind"], self.worker_id))).fetchone()
        if held is None:
            log.warning("reminder %s/%s was taken by another replica; this one stops", row["request_id"], row["kind"])
            return None
        return list(held["told"])

    async def _told(self, row: dict[str, Any], user: str) -> bool:
        """Note ``user`` as told; False (stop) when the row is no longer this replica's."""
        async with self.store.connection() as conn:
            cur = await conn.execute("UPDATE approval_reminders SET told = array_append(told, %s) "
                                     "WHERE request_id = %s AND kind = %s AND claimed_by = %s",
                                     (user, row["request_id"], row["kind"], self.worker_id))
        if cur.rowcount == 0:
            log.warning("reminder %s/%s was taken by another replica after a message to %s; this one stops",
                        row["request_id"], row["kind"], user)
            return False
        return True

    async def _later(self, row: dict[str, Any], error: str, now: datetime | None) -> None:
        delay = min(MAX_RETRY, self.retry_every * 2 ** max(0, int(row["attempts"]) - 1))
        log.warning("reminder %s/%s not sent yet (%s); again in %.0f s", row["request_id"], row["kind"], error, delay)
        async with self.store.connection() as conn:
            await conn.execute(
                """UPDATE approval_reminders SET claimed_by = NULL, claimed_at = NULL, last_error = %s,
                       due_at = coalesce(%s, now()) + make_interval(secs => %s)
                   WHERE request_id = %s AND kind = %s AND claimed_by = %s AND done_at IS NULL""",
                (error[:500], now, delay, row["request_id"], row["kind"], self.worker_id))

    async def _done(self, row: dict[str, Any], outcome: str, now: datetime | None, *, request: OpsRequest | None = None) -> None:
        """The round is over. A review is asked again later (backoff), up to ``REVIEW_ROUNDS`` times."""
        rounds = int(row["rounds"]) + 1
        if row["kind"] == "review" and outcome != "closed" and request is not None and rounds < REVIEW_ROUNDS:
            gap = min(REVIEW_MAX_GAP, (request.remind_after or 600) * 2 ** rounds)
            sql = """UPDATE approval_reminders SET rounds = %s, told = '{}', claimed_by = NULL, claimed_at = NULL, attempts = 0,
                         last_error = NULL, due_at = coalesce(%s, now()) + make_interval(secs => %s)
                     WHERE request_id = %s AND kind = %s AND claimed_by = %s"""
            args: tuple[Any, ...] = (rounds, now, gap, row["request_id"], row["kind"], self.worker_id)
        else:
            sql = """UPDATE approval_reminders SET rounds = %s, done_at = coalesce(%s, now()), outcome = %s, claimed_by = NULL
                     WHERE request_id = %s AND kind = %s AND claimed_by = %s"""
            args = (rounds, now, outcome, row["request_id"], row["kind"], self.worker_id)
        async with self.store.connection() as conn:
            cur = await conn.execute(sql, args)
        if cur.rowcount == 0:
            log.warning("reminder %s/%s was taken by another replica before it was closed here", row["request_id"], row["kind"])
