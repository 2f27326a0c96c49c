"""One `/ops` request, front to back: parse → plan → policy decision → approval (or refusal).

Runs after the edge has acked. Every way a request can end here is answered to the user (with
what to type instead) and recorded in the audit trail. Backends that are down make the request
fail closed: the user is told which backend and why, nothing is created.

Order of the checks, cheapest and least revealing first: who you are (roles, user groups) and
where you are (channel allowlist) before anything is read from a target; then the plan; then the
full decision (frozen environments, conditions, approvals, break-glass); then the limits (rate,
open requests) just before a request is opened, so that refused attempts do not use up a quota.

How much work one process takes on after the ack is bounded (``Admission``): past the bound a
command is answered at once, honestly, that opsbot is busy, and the attempt is audited (``busy``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bot import timeline
from bot.adapters.audit_log import SEARCH_COUNT_CAP
from bot.adapters.ratelimit import RateLimiter
from bot.adapters.store import STATE_DATABASE
from bot.approvals import Approvals
from bot.audit import Audit
from bot.config import Config, parse_since
from bot.domain import SYSTEM, Actor, ChannelId, CommandRequest, Decision, DecisionKind, Invocation, Plan
from bot.errors import (
    BackendUnavailable,
    Busy,
    CardNotPosted,
    DuplicateDelivery,
    DuplicateUndo,
    ExecutionError,
    OpsbotError,
    PolicyDenied,
    UserError,
)
from bot.messages import code, mrkdwn, plural, user_ref
from bot.metrics import Metrics
from bot.policy.engine import decide
from bot.ports import Chat, Context, tell
from bot.redaction import scrub_text
from bot.undo import Undos, UndoStart
from commands.help import command_help, help_text
from commands.registry import command, parse

log = logging.getLogger(__name__)

ATTACHMENT_CHUNK = 3500
ATTACHMENT_MESSAGES = 8


def _chunks(text: str, size: int) -> list[str]:
    """``text`` cut at line ends into pieces of at most ``size`` characters (a longer line is cut)."""
    out: list[str] = []
    current = ""
    for line in text.splitlines():
        while len(line) > size:
            if current:
                out.append(current)
                current = ""
            out.append(line[:size])
            line = line[size:]
        if current and len(current) + 1 + len(line) > size:
            out.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        out.append(current)
    return out


# How many `/ops` commands one process works on at once after their ack. Sized from the
# PostgreSQL pool (bot/adapters/store.py, 10 connections, 10 s wait): an admitted command checks a
# connection out ~8 times (the limits, the request row, its audit row, the card), ~1–3 ms each, so
# with 100 in flight a checkout waits for at most ~100 others, a few tens of ms: far below the pool's
# 10 s wait, which is then only ever reached when the database stopped answering, never because of
# a burst. Redis (32 connections, one round trip at a time) is further from its bound. The bound
# is also the latency under overload: on 2 shared cores one process opens ~60–150 requests/s, so
# 100 in flight wait at most ~1–2 s each, instead of the unbounded queue that grew to tens of
# seconds and ended in false "unavailable" pool timeouts (issue 13). Clicks are not counted: an
# approver's Approve must not be refused because requesters are typing; there are few of them.
MAX_IN_FLIGHT = 10 * 10
# ...and how long an admitted command may take (see ``Admission``): a command admitted is answered
# well before the "still working" notice (bot/slack/app.py, 2 s). Measured at 150/s on 2 shared
# cores (bench/incident_load.py): a 1.5 s target gave command → card p50 0.95 s, 0.75 s gave 0.64 s.
#
# Decision (issue 13): the bound is AIMD, driven by the latency of the commands admitted, not by
# how many finish per second. The earlier bound ("finished per second over 5 s × MAX_WAIT", floor
# 10) measured a throughput that it limited itself: when latency rose for a reason outside this
# process (a slower database, cores taken by a neighbour), fewer finished per second, the bound
# fell, fewer could finish, and it ended at the floor with throughput 10 ÷ latency, although every
# command admitted was still answered in time. Latency is what the user sees and what the bound is
# for, and it does not fall when the bound does, so it cannot feed back that way. Parameters:
# * it starts at ADMISSION_INITIAL (20), not at the limit: a cold process given 150/s took 100
#   at once, far more than it finishes within MAX_WAIT (~50–60 on 2 shared cores), and the ×0.8
#   steps below needed ~5 s to bring the bound down from there (bench/incident_load.py records
#   the bound over a run);
# * the increase is TCP's. "Slow start" while the bound is below its threshold (at first the
#   limit): +1 per admitted command that finished within MAX_WAIT, so the bound doubles in one
#   command's time; it ends (the threshold becomes the bound) once such a command took more than
#   half of MAX_WAIT, or at a decrease. Above the threshold, "congestion avoidance": +1/bound per
#   such command, about +1 per command's time. The first AIMD added +1 per fast command at any
#   level: at 150/s up to ~50 per second, so it overshot the level the latency allows long before
#   the 2 s window said so, and fell back: at 150/s it swung between ~35–40 and 100 every ~6 s
#   (card p99 1.1–1.5 s; now 0.6–1.1 s, the bound within ~30–65), and in a model
#   (tests/unit/test_admission_control.py) between 15 and 75;
# * it grows only while it is used (a command counts if at least ADMISSION_IN_USE, 90 %, of the
#   bound was in flight at some time while it was, and the bound has not grown past what is in
#   flight since): a bound nobody reaches must not grow, or it means nothing when load comes. In
#   slow start it otherwise ran ahead of the commands: 85 with 35-58 in flight (bench run);
# * ×ADMISSION_DECREASE (0.8) when the p90 of the last ADMISSION_WINDOW s exceeds MAX_WAIT and the
#   command leaving, itself over MAX_WAIT, was admitted after the last decrease (those admitted
#   before it measured the old bound, not this one), and at most once per that p90; so one slow
#   spell costs 20 %, not the whole bound; from 100 to the floor takes ~11 slow intervals;
# * no growth while that p90 is over MAX_WAIT; never below ADMISSION_FLOOR (some work always goes
#   on) nor above MAX_IN_FLIGHT.
# A command's time in flight is measured from ``enter`` to ``leave``; callers do not pass it:
# start times are kept first-in first-out, so a ``leave`` measures the oldest command in flight
# (an over-estimate when commands finish out of order, which errs towards shrinking).
MAX_WAIT = 0.75
ADMISSION_FLOOR = 10
ADMISSION_WINDOW = 2.0
ADMISSION_DECREASE = 0.8
ADMISSION_INITIAL = 20
ADMISSION_IN_USE = 0.9  # share of the bound in flight for it to grow
# Busy refusals are audited after they are answered, one append at a time (every append takes the
# audit chain's one lock, which the requests admitted need too); the others wait in memory, and each
# row says when the attempt was made (``result.attempted_at``; the row's ``at`` is when it was written).
# They wait as a small tuple each in one queue, written by one task (``Pipeline._write_busy``), not
# as a task each: under a sustained overload (bench/rss.py sends ~600 commands/s, two thirds of them
# answered busy) the refusals come faster than their rows can be appended, and a task per refusal
# (its coroutine, the Bolt listener awaiting it, the parsed body and command, ~4 KiB in all) was the
# process's RSS growth of ~3 MiB per 1,000 requests: 2,600 such tasks were waiting after 6,000.
# The queue is bounded too (BUSY_BACKLOG, ~0.4 KiB each, a few MiB): past it a refusal is only
# counted, in the queue's last entry, until the writer gets to it: one ``busy`` row for all of those
# (``result.unrecorded``: how many, the first and last ``attempted_at``), written in its place in the
# order, after which refusals are queued one by one again. So an overload that lasts cannot grow the
# process without end, and the trail still says how many were refused and when.
BUSY_BACKLOG = 10_000


BUSY_USERS = 1_000  # users named in one such row (with a count each); the rest as one count


@dataclass
class _Unrecorded:
    """Busy refusals past ``BUSY_BACKLOG``: counted (also per user: who was refused stays on the
    record), recorded as one row."""

    count: int
    first: str
    last: str
    by_user: dict[str, int] = field(default_factory=dict)
    others: int = 0  # refusals of users past BUSY_USERS

    def add(self, user_id: str, attempted_at: str) -> None:
        self.count += 1
        self.last = attempted_at
        if user_id in self.by_user or len(self.by_user) < BUSY_USERS:
            self.by_user[user_id] = self.by_user.get(user_id, 0) + 1
        else:
            self.others += 1


@dataclass(frozen=True)
class Load:
    """What ``Admission`` saw when it refused a command."""

    in_flight: int
    limit: int
    retry_after: int  # seconds, estimated from how fast commands finished lately


class Admission:
    """The bound on commands in flight in one process (each replica has its own). ``enter``
    admits a command or returns the ``Load`` that refused it; an admitted one must ``leave``.

    Two limits: ``limit`` commands at most (sized from the pools, above), and an AIMD bound
    driven by how long admitted commands take (the decision above the constants): starting at
    ``initial``, it grows per command answered within ``max_wait`` s while at least ``in_use`` of
    it was in flight, by one below its threshold and by 1/bound above it, and shrinks by
    ``decrease`` when the p90 of the last ``window`` s exceeds ``max_wait`` (judged on commands
    admitted since the last decrease), at most once per that p90, never below ``floor``.
    ``max_wait=None``: ``limit`` only."""

    def __init__(self, limit: int = MAX_IN_FLIGHT, *, max_wait: float | None = MAX_WAIT, floor: int = ADMISSION_FLOOR,
                 window: float = ADMISSION_WINDOW, decrease: float = ADMISSION_DECREASE, initial: int | None = None,
                 in_use: float = ADMISSION_IN_USE, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError("the admission limit is at least 1")
        if not 0 < decrease < 1:
            raise ValueError("the admission decrease is a factor between 0 and 1")
        self.limit, self.max_wait, self.floor, self.window, self.clock = limit, max_wait, min(floor, limit), window, clock
        self.decrease, self.in_use = decrease, in_use
        self.in_flight = 0
        start = min(limit, ADMISSION_INITIAL) if initial is None else initial
        self._bound = float(max(self.floor, min(limit, start)))
        self._threshold = float(limit)  # below it the bound grows by one per fast command, above by 1/bound
        self._starts: collections.deque[float] = collections.deque()  # when the commands in flight entered, oldest first
        self._done: collections.deque[tuple[float, float]] = collections.deque()  # (finished at, time in flight), last ``window`` s
        self._decreased = -math.inf
        self._used = -math.inf  # when at least ``in_use`` of the bound was last in flight

    def bound(self) -> int:
        """How many may be in flight now."""
        if self.max_wait is None:
            return self.limit
        return max(self.floor, min(self.limit, math.floor(self._bound)))

    def full(self) -> Load | None:
        """The ``Load`` that would refuse a command now, or None if one would be admitted; admits
        nothing (the edge's fast path asks this before Bolt dispatches, bot/runtime.py)."""
        bound = self.bound()
        if self.in_flight >= bound:
            return Load(in_flight=self.in_flight, limit=bound, retry_after=self.retry_after())
        return None

    def enter(self) -> Load | None:
        load = self.full()
        if load is None:
            self.in_flight += 1
            now = self.clock()
            self._starts.append(now)
            if self.in_flight >= self.in_use * self.bound():
                self._used = now
        return load

    def leave(self) -> None:
        now = self.clock()
        if self.in_flight >= self.in_use * self.bound():
            self._used = now
        self.in_flight = max(0, self.in_flight - 1)
        if not self._starts:
            return
        started = self._starts.popleft()
        used = started <= self._used  # the bound was (nearly) full at some time while this command was in flight
        took = now - started
        self._done.append((now, took))
        self._trim(now)
        if self.max_wait is None:
            return
        p90 = self._p90()
        if p90 > self.max_wait:
            if took > self.max_wait and started >= self._decreased and now - self._decreased >= p90:
                self._bound = self._threshold = max(float(self.floor), self._bound * self.decrease)
                self._decreased = now
        elif took <= self.max_wait and used:
            if self._bound < self._threshold and took > self.max_wait / 2:
                self._threshold = self._bound  # slow start ends once latency is half the target
            self._bound = min(float(self.limit), self._bound + (1.0 if self._bound < self._threshold else 1.0 / self._bound))
            if self.in_flight + 1 < self.in_use * self.bound():
                self._used = -math.inf  # grown past what is in flight: it is used again once it fills

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window:
            self._done.popleft()

    def _p90(self) -> float:
        took = sorted(t for _, t in self._done)
        return took[min(len(took) - 1, math.floor(0.9 * len(took)))] if took else 0.0

    def retry_after(self) -> int:
        """Seconds until the commands in flight now are likely done, at the rate they finished
        over the last ``window`` s; 1 to 60."""
        now = self.clock()
        self._trim(now)
        if not self._done:
            return 5  # no measure yet: a modest wait
        rate = len(self._done) / self.window
        return max(1, min(60, math.ceil(self.in_flight / rate)))


class Pipeline:
    def __init__(self, *, config: Config, ctx: Context, chat: Chat, audit: Audit, approvals: Approvals, metrics: Metrics,
                 limiter: RateLimiter, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 admission: Admission | None = None) -> None:
        self.config, self.ctx, self.chat, self.audit, self.approvals, self.metrics = config, ctx, chat, audit, approvals, metrics
        self.limiter, self.clock = limiter, clock
        self.admission = admission or Admission()
        self.undos = Undos(config=config, store=approvals.store, audit=audit, chat=chat)
        # busy refusals not yet audited: (actor, channel, text, why the refusal), oldest first
        self._busy: collections.deque[tuple[Actor, ChannelId, str, dict[str, Any]] | _Unrecorded] = collections.deque()
        self.busy_backlog = BUSY_BACKLOG
        self._unrecorded: _Unrecorded | None = None  # the queue's last entry while it is full
        self.busy_writer: asyncio.Task[None] | None = None  # writes ``_busy``; Runtime.stop waits for it
        metrics.in_flight.set_function(lambda: self.admission.in_flight)
        metrics.admission_bound.set_function(lambda: self.admission.bound())

    def parse(self, req: CommandRequest) -> Invocation:
        """Pure and fast: the edge calls it before the ack to answer usage errors at once."""
        return parse(req.text, self.config)

    async def _reply(self, req: CommandRequest, text: str, *, public: bool = False) -> None:
        """Answer the person who typed the command. If Slack cannot take the answer, it is logged:
        what happened is in the audit trail and, for requests, on the card once Slack is back."""
        await tell(self.chat.respond(response_url=req.response_url, channel_id=req.channel_id, user_id=req.actor.user_id,
                                     text=text, public=public))

    async def _record(self, event: str, req: CommandRequest, *, text: str | None = None, plan: dict[str, Any] | None = None,
                      result: dict[str, Any] | None = None, post: bool = True) -> str:
        """Record an attempt that ends here. Returns a note for the person when the row could only
        be kept in the local spool (the database is down) or not kept at all; never raises."""
        try:
            row = await self.audit.record(event, actor=req.actor, channel_id=req.channel_id, text=req.text if text is None else text,
                                          plan=plan, result=result, post=post)
        except BackendUnavailable as exc:
            log.error("attempt not recorded (%s): %s by %s: %r", exc, event, req.actor.user_id, req.text[:200])
            return f"\n:warning: This attempt could not be recorded in the audit trail ({exc})."
        if row.get("spooled"):
            return ("\n_opsbot's database is down, so this attempt is kept in opsbot's local spool; it will be added to the "
                    "audit trail when the database is back._")
        return ""

    async def record_invalid(self, req: CommandRequest, error: UserError) -> None:
        """A command that did not parse (the user was already told, in the ack): audit only."""
        self.metrics.requests.labels("unknown", "invalid").inc()
        await self._record("invalid", req, result={"error": str(error)})

    async def record_refused_payload(self, req: CommandRequest, error: UserError) -> None:
        """A slash command whose payload is not what Slack sends (the ack said so)."""
        self.metrics.requests.labels("unknown", "malformed").inc()
        await self._record("malformed", req, result={"error": str(error)})

    async def record_refused_click(self, actor: Actor, channel_id: str, error: UserError) -> None:
        """A button click that could not be read as one of opsbot's (its ids are not Slack's)."""
        self.metrics.requests.labels("unknown", "vote_malformed").inc()
        await self._record("vote_refused", CommandRequest(actor=actor, channel_id=ChannelId(channel_id), text=""),
                           result={"why": "malformed", "error": str(error)})

    async def record_click_unavailable(self, actor: Actor, channel_id: str, given: str, error: BackendUnavailable) -> str:
        """A click that could not be counted because a backend is down (the vote is in PostgreSQL):
        recorded (in the local spool when that backend is opsbot's database); returns the note for
        the person about where the record went."""
        self.metrics.requests.labels("unknown", "vote_unavailable").inc()
        if error.backend == STATE_DATABASE:
            self.audit.database_down(str(error))
        return await self._record("vote_refused", CommandRequest(actor=actor, channel_id=ChannelId(channel_id), text=""),
                                  result={"why": "backend_unavailable", "backend": error.backend, "error": str(error),
                                          "request_id_given": given[:64]})

    def record_busy(self, req: CommandRequest, inv: Invocation, load: Load) -> None:
        """A command past the admission bound, already answered in its ack (``busy_text``: no
        extra Slack call, so refusing stays far cheaper than the work refused): queued to be audited
        as ``busy`` with the attempt's text, one append at a time by one task (``busy_writer``),
        not posted to the audit channel (that would add Slack calls to an overload;
        ``opsbot_busy_total`` counts them). Returns at once: the caller's task can end."""
        self.metrics.busy.labels("admission").inc()
        self.metrics.requests.labels(inv.command, "busy").inc()
        attempted_at = self.clock().isoformat()
        if self._unrecorded is not None:  # until the queue before it is written, every refusal is counted in it
            self._unrecorded.add(req.actor.user_id, attempted_at)
        elif len(self._busy) < self.busy_backlog:
            self._busy.append((req.actor, req.channel_id, inv.text,
                               {"why": "admission", "in_flight": load.in_flight, "limit": load.limit,
                                "retry_after": load.retry_after, "attempted_at": attempted_at}))
        else:
            log.warning("busy refusals: %d waiting to be audited, the most kept; the next are counted in one row",
                        len(self._busy))
            self._unrecorded = _Unrecorded(0, attempted_at, attempted_at)
            self._unrecorded.add(req.actor.user_id, attempted_at)
            self._busy.append(self._unrecorded)
        if self.busy_writer is None or self.busy_writer.done():
            self.busy_writer = asyncio.ensure_future(self._write_busy())

    @property
    def busy_pending(self) -> int:
        """Busy refusals answered but not yet audited."""
        return len(self._busy)

    async def _write_busy(self) -> None:
        while self._busy:
            entry = self._busy.popleft()
            if isinstance(entry, _Unrecorded):
                self._unrecorded = None  # the next refusal is queued again
                actor, channel_id, text = SYSTEM, ChannelId(""), ""
                result = {"why": "admission", "unrecorded": {"count": entry.count, "first_attempted_at": entry.first,
                                                             "last_attempted_at": entry.last, "backlog": self.busy_backlog,
                                                             "by_user": entry.by_user, "other_users": entry.others}}
            else:
                actor, channel_id, text, result = entry
            req = CommandRequest(actor=actor, channel_id=channel_id, text=text)
            try:
                note = await self._record("busy", req, text=text, post=False, result=result)
            except Exception:  # never let one row stop the rows behind it
                log.exception("busy refusal of %r by %s: not recorded", text[:200], actor.user_id)
                continue
            if note:
                log.warning("busy refusal of %r by %s: %s", text[:200], actor.user_id, note.strip())

    async def handle(self, req: CommandRequest, inv: Invocation) -> str | None:
        """Handle one command. Returns None, or, when this delivery (``req.delivery_id``) had opened a
        request already, that request's id: the first delivery answered, recorded it and answers;
        the caller decides whether to say more (a slash command retried by Slack: nothing)."""
        try:
            await self._handle(req, inv)
        except DuplicateDelivery as exc:
            log.info("delivered again (delivery %s): %s", req.delivery_id, exc)
            return exc.request_id
        except Busy as exc:  # a pool stayed exhausted for its whole wait (the backend is up): busy, not down
            self.metrics.busy.labels(exc.backend).inc()
            self.metrics.requests.labels(inv.command, "busy").inc()
            note = await self._record("busy", req, text=inv.text, post=False,
                                      result={"why": "pool", "error": str(exc), "backend": exc.backend})
            await self._reply(req, f":hourglass: {exc}. Nothing was changed; try again in a moment.{note}")
        except BackendUnavailable as exc:
            self.metrics.requests.labels(inv.command, "backend_unavailable").inc()
            if exc.backend == STATE_DATABASE:
                self.audit.database_down(str(exc))
            note = await self._record("refused", req, text=inv.text, result={"error": str(exc), "backend": exc.backend})
            await self._reply(req, f":x: Refused: {exc}. Nothing was changed; try again when it is back.{note}")
        except OpsbotError as exc:
            self.metrics.requests.labels(inv.command, "refused").inc()
            note = await self._record("refused", req, text=inv.text, result={"error": str(exc)})
            await self._reply(req, f":x: {exc}{note}")
        except Exception as exc:
            log.exception("unexpected error handling %r", req.text)
            self.metrics.requests.labels(inv.command, "error").inc()
            note = await self._record("error", req, text=inv.text, result={"error": f"internal error ({type(exc).__name__})"})
            await self._reply(req, ":x: opsbot hit an internal error; nothing was changed. The error is in opsbot's logs." + note)
        return None

    def _decide(self, subject: Plan | str, actor: Actor, req: CommandRequest, inv: Invocation | None = None,
                *, anywhere: bool = False) -> Decision:
        return decide(subject, actor, self.config, channel_id=None if anywhere else req.channel_id, now=self.clock(),
                      break_glass=bool(inv and inv.flags.break_glass))

    async def _handle(self, req: CommandRequest, inv: Invocation) -> None:
        if inv.command == "help":
            await self._help(req, inv)
            await self._record("read", req, text=inv.text, result={"help": str(inv.params.get("topic") or "")}, post=False)
            return
        if inv.command == "cancel":
            await self._reply(req, await self.approvals.cancel(str(inv.params["request_id"]), req.actor, channel_id=req.channel_id))
            return
        actor = await self.approvals.with_groups(req.actor)  # fails closed when groups cannot be checked
        if inv.command == "pending":
            await self._pending(req, actor)
            await self._record("read", req, text=inv.text, result={"pending": True}, post=False)
            return
        if inv.command == "audit":
            await self._audit_search(req, inv, actor)
            return
        if inv.command == "timeline":
            await self._timeline(req, inv, actor)
            return
        undo: UndoStart | None = None
        if inv.command == "undo":  # the inverse of a request, then the same path as if it had been typed (bot/undo.py)
            undo = await self.undos.start(req, inv)
            if undo is None:
                return
            inv = undo.invocation
        cmd = command(inv.command, self.config)
        # Policy first on the command alone, so people who may not run it learn nothing by planning.
        pre = self._decide(inv.command, actor, req, inv)
        if pre.kind is DecisionKind.DENY:
            await self._denied(req, inv, PolicyDenied(pre.reason, rule=pre.rule), plan=None, roles=True)
            if undo is not None:  # on the original's trail too, where auditors follow its undos
                await self.undos.refuse(req, undo.asked, undo.original, pre.reason, why="policy_denied", reply=False)
            return
        try:
            plan = await cmd.plan(inv.params, self.ctx)
        except UserError as exc:
            if undo is not None:  # e.g. "already has 3 replicas": someone put it back already
                await self.undos.refuse(req, undo.asked, undo.original, f"{exc} Nothing was requested.", why="inverse_refused")
                return
            await self._invalid(req, exc, inv)
            return
        except (ExecutionError, BackendUnavailable) as exc:
            if undo is not None:  # the target cannot be read, so whether it moved on cannot be told: fail closed
                await self.undos.refuse(req, undo.asked, undo.original, f"{exc}, so opsbot cannot check that the target is "
                                        "still as it was left. Nothing was requested; try again when it is back.",
                                        why="backend_unavailable", backend=getattr(exc, "backend", cmd.backend))
                return
            if isinstance(exc, BackendUnavailable):
                raise
            raise BackendUnavailable("the target", str(exc)) from exc
        if undo is not None and not await self.undos.still_as_left(req, undo, plan):
            return
        decision = self._decide(plan, actor, req, inv)
        if decision.kind is DecisionKind.DENY:
            await self._denied(req, inv, PolicyDenied(decision.reason, rule=decision.rule), plan=plan.to_json(), roles=True)
            if undo is not None:
                await self.undos.refuse(req, undo.asked, undo.original, decision.reason, why="policy_denied", plan=plan,
                                        reply=False)
            return
        if not plan.mutating:
            self.metrics.requests.labels(inv.command, "read").inc()
            await self._record("read", req, text=inv.text, plan=plan.to_json(), post=False)
            answer = scrub_text(f"*{plan.summary}*\n" + "\n".join(f"• {d}" for d in plan.details), self.audit.secrets)
            if plan.attachment:
                await self._reply_with_attachment(req, answer, scrub_text(plan.attachment, self.audit.secrets))
            else:
                await self._reply(req, answer, public=True)
            return
        if inv.flags.dry_run:
            self.metrics.requests.labels(inv.command, "dry_run").inc()
            note = await self._record("dry_run", req, text=inv.text, plan=plan.to_json(), post=False,
                                      result={"decision": decision.kind.value, "reason": decision.reason, "rule": decision.rule})
            where = f"• target: {code(plan.target_label or plan.target)} · environment: *{mrkdwn(plan.environment)}*"
            await self._reply(req, f":mag: Dry run — nothing was changed.\n*{mrkdwn(plan.summary)}*\n"
                              + "\n".join([where, *(f"• {mrkdwn(d)}" for d in plan.details)]) + f"\n• policy: {decision.reason}" + note)
            return
        refusal = await self._over_limits(req, inv, decision)
        if refusal:
            await self._denied(req, inv, PolicyDenied(refusal[0], rule=refusal[1]), plan=plan.to_json())
            if undo is not None:
                await self.undos.refuse(req, undo.asked, undo.original, refusal[0], why="limits", plan=plan, reply=False)
            return
        self.metrics.requests.labels(inv.command, "requested").inc()
        try:
            link = {"undo_of": undo.original.id, "undo_of_link": await self.undos.link(undo)} if undo is not None else {}
            opened = await self.approvals.open(req, inv, plan, decision, **link)
        except CardNotPosted as exc:  # recorded as a failed request already
            await self._reply(req, f":x: {exc}")
        except DuplicateUndo as exc:  # two clicks on Undo at once: the other one opened it
            assert undo is not None
            await self.undos.refuse(req, undo.asked, undo.original, str(exc), why="duplicate", undo=exc.undo_id)
        else:
            if undo is not None:
                await self.undos.opened(req, undo, opened)

    async def _reply_with_attachment(self, req: CommandRequest, answer: str, attachment: str) -> None:
        """A read whose output is long (log lines): the answer in the channel, the output in its
        thread in code blocks of at most ``ATTACHMENT_CHUNK`` characters (Slack's limits on a
        message), ``ATTACHMENT_MESSAGES`` at most. If the bot cannot post in the channel, the person
        gets the answer privately with the end of the output."""
        try:
            ts = await self.chat.post_message(channel_id=req.channel_id,
                                              text=f"{req.actor.mention()} asked `/ops {req.text}`\n{answer}")
            chunks = _chunks(attachment, ATTACHMENT_CHUNK)
            if len(chunks) > ATTACHMENT_MESSAGES:
                first = "…(earlier lines cut; narrow it with --since, --tail or --grep)\n" + chunks[-ATTACHMENT_MESSAGES]
                chunks = [first[:ATTACHMENT_CHUNK], *chunks[-ATTACHMENT_MESSAGES + 1:]]
            for chunk in chunks:
                await self.chat.post_message(channel_id=req.channel_id, text=f"```\n{chunk}\n```", thread_ts=ts)
        except OpsbotError as exc:
            tail = attachment[-ATTACHMENT_CHUNK:]
            await self._reply(req, f"{answer}\n_Could not post the output in the channel ({exc}); its end:_\n```\n{tail}\n```")

    async def _over_limits(self, req: CommandRequest, inv: Invocation, decision: Decision) -> tuple[str, str] | None:
        limits = self.config.limits
        cap = min(limits.max_open_requests_per_user, decision.max_open_per_user or limits.max_open_requests_per_user)
        open_ids = await self.approvals.store.open_requests_of(req.actor.user_id, limit=cap)
        if len(open_ids) >= cap:
            return (f"you already have {plural(len(open_ids), 'open request')} ({', '.join(f'`{i}`' for i in open_ids)}); "
                    f"the limit is {cap}. "
                    "Wait for them, or withdraw one with `/ops cancel <request-id>`."), "limits.max_open_requests_per_user"
        for i, rate in enumerate(limits.rate):
            if rate.commands and inv.command not in rate.commands:
                continue
            wait = await self.limiter.hit(f"{i}:{inv.command}:{req.actor.user_id}", limit=rate.per_user, window_seconds=rate.window)
            if wait is not None:
                return (f"rate limit: at most {plural(rate.per_user, f'`{inv.command}` request')} per {rate.window} s per person. "
                        f"Try again in {max(1, round(wait))} s."), f"limits.rate[{i}]"
        return None

    async def _help(self, req: CommandRequest, inv: Invocation) -> None:
        note = ""
        try:
            actor = await self.approvals.with_groups(req.actor)
        except BackendUnavailable as exc:
            actor, note = req.actor, f"\n_Could not check your Slack user groups ({exc}); roles from them are not shown._"
        else:
            note = self.approvals.usergroup_note()
        topic = str(inv.params.get("topic") or "")
        # What you may run at all; where you may run it is said below when it is not here.
        text = (command_help(topic, lambda name: self._decide(name, actor, req, anywhere=True), self.config) if topic
                else help_text(lambda name: self._decide(name, actor, req, anywhere=True), self.config))
        allowed = self.config.slack.allowed_channels
        if allowed and req.channel_id not in allowed:
            note += "\n:warning: Commands are not taken in this channel; use " + ", ".join(f"<#{c}>" for c in allowed) + "."
        await self._reply(req, text + note)

    async def _pending(self, req: CommandRequest, actor: Actor) -> None:
        requests = await self.approvals.pending_for(actor)
        if not requests:
            await self._reply(req, "No open requests are waiting for you." + self.approvals.usergroup_note())
            return
        lines = [f"*{plural(len(requests), 'request')} you may approve*"]
        for r in requests:
            got = sum(a.decision == "approve" for a in r.approvals)
            where = f"<#{r.card_channel}>" if r.card_channel else "its channel"
            link = await self.approvals.card_link(r)
            card = f"<{link}|card> in {where}" if link else f"in {where}"
            lines.append(f"• `{r.id}` {mrkdwn(r.summary)} — {r.requester.mention()}, {got}/{r.approvals_required} approvals, "
                         f"expires {r.expires_at:%H:%M} UTC, {card}")
        await self._reply(req, "\n".join(lines))

    async def _audit_search(self, req: CommandRequest, inv: Invocation, actor: Actor) -> None:
        decision = self._decide("audit", actor, req)
        if decision.kind is DecisionKind.DENY:
            await self._denied(req, inv, PolicyDenied(decision.reason, rule=decision.rule), plan=None, roles=True)
            return
        p = inv.params
        page, size = int(p.get("page", 1)), 15
        before = int(p["before"]) if p.get("before") is not None else None
        # Matches are counted up to SEARCH_COUNT_CAP (an index scan of that many entries at most), and
        # --page N goes no deeper than the count: past it, narrowing the search is the honest answer.
        # --before #N (keyset: the rows older than #N, what "Next:" offers) seeks in the index at any depth.
        deepest = SEARCH_COUNT_CAP // size
        if before is None and page > deepest:
            await self._reply(req, f"Page {page} is deeper than opsbot pages ({deepest} pages of {size}, the newest "
                              f"{SEARCH_COUNT_CAP} rows): narrow {code('/ops ' + inv.text)} with --since, --user, --command, "
                              "--target or --outcome.")
            return
        rows, total = await self.audit.log.search(
            user=p.get("user"), command=p.get("command"), target=p.get("target"),
            since=parse_since(p["since"], self.clock()) if p.get("since") else None, outcome=p.get("outcome"),
            limit=size + 1, offset=0 if before is not None else (page - 1) * size, before_seq=before)
        more, rows = len(rows) > size, rows[:size]  # one row past the page: is there a next one?
        capped = total > SEARCH_COUNT_CAP
        # Reading the record is itself recorded (not posted: auditors' searches are not news).
        await self.audit.record("read", actor=req.actor, channel_id=req.channel_id, text=inv.text,
                                result={"audit_query": {k: v for k, v in p.items()}, "matches": min(total, SEARCH_COUNT_CAP),
                                        **({"more_than": SEARCH_COUNT_CAP} if capped else {})}, post=False)
        pages = deepest if capped else max(1, -(-total // size))
        of_pages = f"older than #{before}" if before is not None else f"page {page}" if capped else f"page {page} of {pages}"
        if not rows:
            await self._reply(req, f"No audit rows match {code('/ops ' + inv.text)}" + (f" ({of_pages})." if total else "."))
            return
        many = f"More than {SEARCH_COUNT_CAP:,} audit rows match" if capped else \
            f"{plural(total, 'audit row')} {'matches' if total == 1 else 'match'}"
        lines = [f"*{many}* — {of_pages}, newest first"]
        for r in rows:
            plan = r["plan"] or {}
            what = mrkdwn(plan["summary"]) if plan.get("summary") else code(f"/ops {r['command_text']}")
            where = f" [{plan['environment']}]" if plan.get("environment") else ""
            req_id = f" `{r['request_id']}`" if r["request_id"] else ""
            who = "opsbot" if r["actor_id"] == SYSTEM.user_id else user_ref(r["actor_id"])
            lines.append(f"`#{r['seq']}` {r['at']:%Y-%m-%d %H:%M} *{r['event']}* {who}: {what}{where}{req_id}")
        if more:
            words, keep = inv.text.split(" "), []
            for i, w in enumerate(words):  # the filters as typed, without the paging flag (and its value)
                if w in ("--page", "--before") or w.startswith(("--page=", "--before=")) or (i and words[i - 1] in ("--page", "--before")):
                    continue
                keep.append(w)
            base, last = " ".join(keep).strip(), rows[-1]["seq"]
            lines.append(f"Next: {code(f'/ops {base} --before {last}')}")
        await self._reply(req, "\n".join(lines))

    async def _timeline(self, req: CommandRequest, inv: Invocation, actor: Actor) -> None:
        """`/ops timeline` (bot/timeline.py). Who may: whoever the `audit` rule lets read the trail
        (a timeline is a read of it). The timeline of the channel it is typed in is posted there, with
        the Markdown file in the message's thread. The timeline of another channel is never posted
        here (this channel's members need not be that channel's): it goes to the asker's direct
        message with opsbot, file included, and the answer here (ephemeral) says so; if that DM cannot
        be opened or posted to, nothing is posted anywhere but the private answer. Recorded as a read
        (not posted to the audit channel), with where it went."""
        decision = self._decide("audit", actor, req)
        if decision.kind is DecisionKind.DENY:
            await self._denied(req, inv, PolicyDenied(decision.reason, rule=decision.rule), plan=None, roles=True)
            return
        p, now = inv.params, self.clock()
        channel = str(p.get("channel") or req.channel_id)
        since = parse_since(str(p["since"]), now)
        until = parse_since(str(p["until"]), now) if p.get("until") else now
        problem = ("`--channel all` is not taken in Slack: other channels' activity may not be for this channel's members. "
                   "Name one channel (its timeline is sent to you privately), or run `opsbot audit timeline` (every channel) on the CLI."
                   if channel == "all" else
                   f"the window is empty: `--since` ({since:%Y-%m-%d %H:%M} UTC) must be before `--until` ({until:%Y-%m-%d %H:%M} UTC)."
                   if since >= until else "")
        if problem:
            await self._invalid(req, UserError(problem), inv)
            return
        tl = await timeline.collect(self.audit.log, channel=channel, since=since, until=until, now=now)
        again = f"timeline --channel <#{channel}>" + (f" --until {p['until']}" if p.get("until") else "")
        private = channel != req.channel_id
        asked = f"{req.actor.mention()} asked {code('/ops ' + inv.text)}" + (f" in <#{req.channel_id}>" if private else "")
        text = f"{asked}\n" + timeline.message_text(tl, command=again)
        outcome: dict[str, Any] = {"channel": channel, "since": since.isoformat(), "until": until.isoformat(),
                                   "entries": len(tl.entries), "seqs": tl.seqs, "truncated": tl.truncated,
                                   "sent_to": "dm" if private else "channel"}
        cli = f"`opsbot audit timeline --channel {channel} --since {since:%Y-%m-%dT%H:%M:%S} --until {until:%Y-%m-%dT%H:%M:%S} --format md`"
        where: str = req.channel_id
        try:
            if private:  # a conversation id, not the user id: files are shared only in a conversation
                where = await self.chat.open_dm(user_id=req.actor.user_id)
                outcome["dm"] = where
            ts = await self.chat.post_message(channel_id=where, text=text)
        except OpsbotError as exc:
            outcome["posted"] = f"no: {exc}"
            note = await self._record("read", req, text=inv.text, result={"timeline": outcome}, post=False)
            if private:  # fail closed: only the asker is told, and nothing of the other channel is shown
                await self._reply(req, f":warning: The timeline of <#{channel}> lists another channel's activity, so it is sent "
                                  f"only to you privately, in your direct message with opsbot, and that failed ({exc}). Nothing was "
                                  f"posted here; get it with {cli}.{note}")
            else:
                await self._reply(req, f"{text}\n:warning: Could not post the timeline in the channel ({exc}), so no file was attached; "
                                  f"get it with {cli}.{note}")
            return
        outcome["posted"] = "yes"
        try:
            await self.chat.upload_file(channel_id=where, thread_ts=ts, filename=timeline.filename(tl),
                                        title=f"Incident timeline, {since:%Y-%m-%d %H:%M}–{until:%H:%M} UTC", content=timeline.markdown(tl))
            outcome["file"] = timeline.filename(tl)
        except OpsbotError as exc:
            outcome["file"] = f"not attached: {exc}"
            await tell(self.chat.update_message(channel_id=where, ts=ts, text=f"{text}\n:warning: The Markdown file could not "
                                                f"be attached ({exc}); get it with {cli}."))
        note = await self._record("read", req, text=inv.text, result={"timeline": outcome}, post=False)
        if private:
            missing = ("" if outcome["file"] == timeline.filename(tl) else
                       f" (without its Markdown file, {outcome['file']}; get it with {cli})")
            await self._reply(req, f":envelope: The timeline of <#{channel}> was sent to you privately: it lists another channel's "
                              f"activity. It is in your direct message with opsbot{missing}; nothing was posted here.{note}")

    async def _invalid(self, req: CommandRequest, error: UserError, inv: Invocation) -> None:
        self.metrics.requests.labels(inv.command, "invalid").inc()
        note = await self._record("invalid", req, result={"error": str(error)})
        await self._reply(req, f":x: {error}{note}")

    async def _denied(self, req: CommandRequest, inv: Invocation, error: PolicyDenied, plan: dict[str, Any] | None,
                      *, roles: bool = False) -> None:
        """A refusal by the policy. ``roles``: it may come from the person's roles, so configured user
        groups that grant nothing because the configuration is wrong are named (and recorded)."""
        self.metrics.requests.labels(inv.command, "policy_denied").inc()
        result: dict[str, Any] = {"error": str(error), "rule": error.rule}
        groups = self.approvals.usergroup_note() if roles else ""
        if groups:
            result["usergroup_problems"] = self.approvals.usergroup_problems()
        note = await self._record("policy_denied", req, text=inv.text, plan=plan, result=result)
        await self._reply(req, f":no_entry: Not allowed: {error}{groups}{note}")
