"""The audit trail: every step of every request, through ``Audit.record`` (the one function every
stage calls), and its copy in the audit channel.

The PostgreSQL row is the record (bot/adapters/audit_log.py: append-only, hash-chained). It is
written together with an outbox entry; ``AuditPoster`` copies the outbox to Slack in order, one
headline message per request (updated as the state changes, linked to the approval card and back)
with each step as a reply in its thread, and one compact line per attempt that never became a
request. When Slack is unreachable, nothing is lost: the outbox keeps the rows and the poster
catches up. A post is marked done only once Slack has answered with its ts; when Slack timed out
after we sent (the post may have arrived), the next attempt first looks for the row's hash in the
channel, so nothing is posted twice.

Secrets never reach the record: keys that name secrets are redacted wherever they appear, and the
values of the bot's own secrets (tokens, database and Redis URLs and their passwords) are scrubbed
from every string.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from bot.adapters.audit_log import AuditLog
from bot.adapters.spool import AuditSpool
from bot.adapters.store import Store
from bot.domain import Actor, OpsRequest
from bot.errors import BackendUnavailable, Busy, DeliveryUncertain, OpsbotError, RateLimited
from bot.lru import LRU
from bot.messages import HASH_PREFIX, audit_headline, audit_line, audit_request_line
from bot.metrics import Metrics
from bot.notices import MAX_UNCERTAIN, deliver, permanent, retry_delay, stop_loop
from bot.ports import Chat
from bot.untrusted import storable

log = logging.getLogger(__name__)

_SECRET_KEYS = ("token", "secret", "password", "authorization", "dsn", "credential")

# A backlog goes out in few messages. Slack lets an app post about one message per second per
# channel (short bursts allowed, then 429 with Retry-After), so characters per message is what
# drains a backlog: a message carries up to CHARS_PER_MESSAGE characters of audit lines (Slack
# truncates text past 40,000; the margin is for the line breaks and mrkdwn escapes), a long line
# alone if need be; a headline message is shared by the requests new in the same backlog, up to
# HEADLINES_PER_MESSAGE and the same number of characters. An audit line is ~200 characters, so one
# message per second carries ~190 rows/s: ~40 mutating commands/s at their ~5 rows each, bursts above.
# (Before: 120 lines, 30,000 characters and 25 headlines per message, ~120 rows/s at best.)
#
# Under a backlog (more due than one message of full lines), the rows of one request in one message
# become one line (``audit_request_line``: each row's seq and hash prefix, the last row's full hash),
# ~330 characters for a request's 5 rows instead of ~1,000; and a headline message is shared by up to
# HEADLINES_PER_MESSAGE requests (~230 characters each), so that at 50 commands/s the channel needs
# a few messages per second's worth of commands, not one per 40 requests plus one per 190 rows.
# A 429 whose Retry-After is at most RATE_LIMIT_WAIT s is waited out within the round (up to
# RATE_LIMIT_WAITS times a message); a longer one ends the round, the rows tried again then.
RATE_LIMIT_WAIT = 3.0
RATE_LIMIT_WAITS = 5
BATCH_ROWS = 2000
LINES_PER_MESSAGE = 1000
CHARS_PER_MESSAGE = 38_000
HEADLINES_PER_MESSAGE = 150  # a headline update draws its message whole, its members read in 3 queries in all
ROWS_PER_LINE = 50  # a request with more rows due than this gets several lines


def _lines(rows: list[dict[str, Any]], *, compact: bool) -> list[tuple[list[dict[str, Any]], str]]:
    """The lines of a thread's rows (seq order, a request's rows together): one per row, or under a
    backlog one per request (a line too long for that, e.g. a huge value, goes back to one per row)."""
    if not compact:
        return [([row], audit_line(row)) for row in rows]
    units: list[list[dict[str, Any]]] = []
    for row in rows:
        if units and row["request_id"] and units[-1][-1]["request_id"] == row["request_id"] and len(units[-1]) < ROWS_PER_LINE:
            units[-1].append(row)
        else:
            units.append([row])
    lines: list[tuple[list[dict[str, Any]], str]] = []
    for unit in units:
        line = audit_request_line(unit)
        if len(unit) > 1 and len(line) > CHARS_PER_MESSAGE // 4:
            lines.extend(([row], audit_line(row)) for row in unit)
        else:
            lines.append((unit, line))
    return lines


def _chunks(lines: list[tuple[list[dict[str, Any]], str]]) -> list[list[tuple[list[dict[str, Any]], str]]]:
    chunks: list[list[tuple[list[dict[str, Any]], str]]] = []
    size = count = 0
    for unit, line in lines:
        n = len(line) + 1
        if not chunks or count + len(unit) > LINES_PER_MESSAGE or size + n > CHARS_PER_MESSAGE:
            chunks.append([])
            size = count = 0
        chunks[-1].append((unit, line))
        size += n
        count += len(unit)
    return chunks


def _seq_range(seqs: list[int]) -> str:
    return str(seqs[0]) if len(seqs) == 1 else f"{seqs[0]}..{seqs[-1]} ({len(seqs)})"


def _headline_parts(new: list[str], requests: dict[str, OpsRequest | None],
                    groups: dict[str | None, list[dict[str, Any]]], links: Permalinks | None = None) -> list[list[str]]:
    """The new requests cut into shared headline messages: at most HEADLINES_PER_MESSAGE each and,
    counting a card link at its longest, at most CHARS_PER_MESSAGE characters."""
    parts: list[list[str]] = []
    size = 0
    for request_id in new:
        request = requests[request_id]
        assert request is not None
        # the card link's length once the workspace's link form is known, else its longest
        link = links.built(request.card_channel, request.card_ts) if links and request.card_channel and request.card_ts else None
        n = len(audit_headline(request, groups[request_id][-1], link)) + (0 if link else CARD_LINK_CHARS) + HEADLINE_GROWTH + 2
        if not parts or len(parts[-1]) >= HEADLINES_PER_MESSAGE or size + n > CHARS_PER_MESSAGE:
            parts.append([])
            size = 0
        parts[-1].append(request_id)
        size += n
    return parts


# A shared headline message is drawn again whole as its requests move on: room for each to grow to
# the longest state label, the "its rollout/job failed" mark and a longer seq, so that no update
# takes the message past Slack's 40,000 characters.
HEADLINE_GROWTH = 130
CARD_LINK_CHARS = 120  # " · <https://….slack.com/archives/C…/p…|approval card>", an Enterprise Grid URL included


# How many entries the audit poster keeps in memory, each ~0.3 KiB (they were up to 50,000 and
# 10,000, cleared or frozen when full). What it keeps saves a read or a Slack call for the rows of a
# request still coming in; a request whose entry was dropped costs one batched read (its thread is
# in audit_threads) or one chat.getPermalink, never a wrong answer. A few thousand requests cover
# everything still moving at any sustained rate the process takes.
THREADS_KEPT = 5_000
PERMALINKS_KEPT = 2_000


class Permalinks:
    """Message links without a chat.getPermalink per message. A workspace's links are
    ``<workspace URL>/archives/<channel>/p<ts without the dot>``; the first answer that has that
    form teaches the workspace URL, and links are built from it from then on. Until then (or if
    Slack's answer has another form, e.g. on an Enterprise Grid) each link is asked for once and
    remembered."""

    def __init__(self, chat: Chat, *, remember: int = PERMALINKS_KEPT) -> None:
        self.chat, self.remember = chat, remember
        self.base: str | None = None
        self._known: LRU[tuple[str, str], str] = LRU(remember)

    @staticmethod
    def _path(channel: str, ts: str) -> str:
        return f"/archives/{channel}/p{ts.replace('.', '')}"

    def built(self, channel: str, ts: str) -> str | None:
        """The link, if it can be built without asking Slack."""
        return self.base + self._path(channel, ts) if self.base is not None else self._known.get((channel, ts))

    async def get(self, channel: str, ts: str) -> str | None:
        if self.base is not None:
            return self.base + self._path(channel, ts)
        if (channel, ts) in self._known:
            return self._known[(channel, ts)]
        link = await self.chat.permalink(channel_id=channel, ts=ts)
        if link is None:
            return None  # not remembered: a link is a convenience, asked again next time
        if "." in ts and link.endswith(self._path(channel, ts)) and link.startswith("https://"):
            self.base = link[: -len(self._path(channel, ts))]
        else:  # the most recent are kept: a link is asked for again while its request's rows still come
            self._known[(channel, ts)] = link
        return link


def secret_values(values: Iterable[str | None]) -> tuple[str, ...]:
    """The strings to scrub: each secret, and the password inside each URL."""
    found: set[str] = set()
    for v in values:
        if not v:
            continue
        found.add(v)
        with contextlib.suppress(ValueError):
            password = urlsplit(v).password
            if password:
                found.add(password)
    return tuple(sorted((s for s in found if len(s) >= 4), key=len, reverse=True))


def redact(value: Any, secrets: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        return {k: "[redacted]" if any(s in k.lower() for s in _SECRET_KEYS) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, "[redacted]")
    return value


class Audit:
    def __init__(self, log: AuditLog, *, audit_channel: str | None, secrets: tuple[str, ...] = (),
                 spool: AuditSpool | None = None) -> None:
        self.log, self.audit_channel, self.secrets, self.spool = log, audit_channel, secrets, spool
        self.appended = asyncio.Event()  # wakes the poster
        # While the database is known to be down, rows go straight to the spool instead of each
        # waiting for the pool's timeout first (the person is waiting for an answer). Known down:
        # an append failed, or a request was just refused because of it, in the last few seconds.
        self._down_until = 0.0
        self._down_reason = ""

    def database_down(self, reason: str, *, for_seconds: float = 5.0) -> None:
        self._down_until = time.monotonic() + for_seconds
        self._down_reason = reason

    async def record(self, event: str, *, actor: Actor, channel_id: str = "", request_id: str | None = None,
                     text: str = "", plan: dict[str, Any] | None = None, result: dict[str, Any] | None = None,
                     post: bool = True) -> dict[str, Any]:
        """Append one row. When opsbot's database is down, the row is kept in the local spool
        instead and the returned dict has ``spooled: True`` (callers tell the user); only a full
        (or absent) spool raises."""
        entry = {"event": event, "actor_id": actor.user_id, "actor_name": actor.name, "channel_id": channel_id,
                 "request_id": request_id, "command_text": text, "plan": plan, "result": result,
                 "post": post and bool(self.audit_channel)}
        entry = storable(redact(entry, self.secrets))
        if self.spool is not None and time.monotonic() < self._down_until:
            return await self._spool(entry, self._down_reason)
        try:
            row = await self.log.append(**entry)
        except BackendUnavailable as exc:
            if self.spool is None:
                raise
            if not isinstance(exc, Busy):  # a busy pool is not a database that is down: spool this row only
                self.database_down(str(exc))
            return await self._spool(entry, str(exc))
        self.appended.set()
        return row

    async def _spool(self, entry: dict[str, Any], why: str) -> dict[str, Any]:
        assert self.spool is not None
        kept = await self.spool.put(entry, why=why)
        log.warning("audit row %s kept in the local spool: %s", entry["event"], why)
        return {**kept, "spooled": True}

    async def drain_spool(self) -> int:
        """Append what the spool kept while the database was down (the poster calls this)."""
        if self.spool is None:
            return 0
        n = await self.spool.drain(lambda entry: self.log.append_once(**entry))
        if n:
            self._down_until = 0.0
            self.appended.set()
        return n


class AuditPoster:
    """Copies the outbox to the audit channel, in seq order, at most once per row (see bot/notices.py
    for the delivery rules it shares with the incident channel), and drains the local spool."""

    def __init__(self, *, audit: Audit, store: Store, chat: Chat, metrics: Metrics | None = None, interval: float = 2.0) -> None:
        self.audit, self.store, self.chat, self.metrics, self.interval = audit, store, chat, metrics, interval
        self._task: asyncio.Task[None] | None = None
        self.permalinks = Permalinks(chat)
        # request id → the ts of its audit thread's headline, once known: a thread, once saved, never
        # moves, so the rows of a request already in the channel need no database reads to place
        # them (under sustained load those reads, two per request per round, were the poster's cost).
        self._threads: LRU[str, str] = LRU(THREADS_KEPT)
        self._held_back = False  # a post failed: new rows do not wake the loop before the retry time
        self._stopping = False

    @property
    def channel(self) -> str | None:
        return self.audit.audit_channel

    async def run_once(self) -> int:
        """Post what is due; returns how many rows were posted. Stops at the first row that fails
        or is not due yet, so that the channel never shows rows out of order.

        A backlog goes out in few messages: the due rows of one request's thread become one reply
        (several audit lines, each as ``audit_line`` writes it, or under a backlog one line per
        request, ``audit_request_line``: what `opsbot audit verify --against-channel` reads line by
        line), and so do the rows that are lines of their own. A row whose last post is uncertain is
        delivered alone, looked for first by its hash's first digits."""
        try:
            await self.audit.drain_spool()
        except BackendUnavailable:
            pass  # the database (or the spool) is still away; the spool keeps what it has
        except Exception:  # never let the spool stop the audit channel
            log.exception("audit spool: draining failed; posting goes on, and the spool is tried again")
        if not self.channel:
            return 0
        posted = 0
        async with await self.audit.log.poster_lock() as mine:
            if not mine:  # another replica is posting
                return 0
            due: list[dict[str, Any]] = []
            for row in await self.audit.log.due_posts(BATCH_ROWS):
                if not row["due"]:
                    break
                due.append(row)
            while due:
                if due[0]["uncertain"]:
                    batch, due = due[:1], due[1:]
                else:  # up to the next uncertain row
                    cut = next((i for i, r in enumerate(due) if r["uncertain"]), len(due))
                    batch, due = due[:cut], due[cut:]
                done, failed = await self._post_batch(self.channel, batch)
                posted += done
                if failed:
                    break
            await self._headlines(self.channel)
        return posted

    async def _post_batch(self, channel: str, rows: list[dict[str, Any]]) -> tuple[int, bool]:
        """Post ``rows`` (seq order) grouped by where they go; (rows posted, whether one failed)."""
        groups: dict[str | None, list[dict[str, Any]]] = {}  # a thread's request id, or None: lines of their own
        threads: dict[str, str] = {}  # request id → its headline's ts
        # Whatever the number of requests in the batch, their requests and threads are read in one
        # query each (per request, those reads were what held the poster back under sustained load).
        unknown = list(dict.fromkeys(r["request_id"] for r in rows if r["request_id"] and r["request_id"] not in self._threads))
        requests: dict[str, OpsRequest | None] = dict(await self.store.get_many(unknown)) if unknown else {}
        for request_id in {r["request_id"] for r in rows if r["request_id"] in self._threads}:
            threads[request_id] = self._threads[request_id]
        saved = await self.audit.log.threads_of([r for r in requests if r not in threads])
        threads.update(saved)
        for row in rows:
            request_id = row["request_id"]
            known = request_id in threads or (request_id and requests.get(request_id) is not None)
            groups.setdefault(request_id if known else None, []).append(row)
        new = [r for r in groups if r is not None and r not in threads]
        for part in _headline_parts(new, requests, groups, self.permalinks):
            try:
                ts = await self._headline(channel, [(requests[r], groups[r]) for r in part])
            except OpsbotError as exc:  # not posted: the first row of each of its requests waits
                await self._failed([groups[request_id][0] for request_id in part], exc)
                return 0, True
            threads.update(dict.fromkeys(part, ts))
        self._threads.update(threads.items())
        # Requests sharing a headline share its thread: their rows go out together, request by request.
        by_thread: dict[str | None, list[dict[str, Any]]] = {}
        for request_id, group in groups.items():
            by_thread.setdefault(None if request_id is None else threads[request_id], []).extend(group)
        # A backlog: more due than one message of full lines carries.
        compact = sum(len(audit_line(r)) + 1 for r in rows) > CHARS_PER_MESSAGE
        posted = 0
        for thread_ts, group in by_thread.items():
            for chunk in _chunks(_lines(group, compact=compact)):
                done = [r for unit, _ in chunk for r in unit]
                try:
                    # The needle is in the message whichever way the row was written: its hash's
                    # first digits (an uncertain row is retried alone, looked for by them).
                    ts = await self._deliver(channel=channel, text="\n".join(line for _, line in chunk),
                                       thread_ts=thread_ts, needle=f"{done[0]['hash'][:HASH_PREFIX]}", uncertain=done[0]["uncertain"])
                except OpsbotError as exc:
                    await self._failed(done, exc)
                    return posted, True
                await self.audit.log.mark_posted_many([int(r["seq"]) for r in done], ts)
                posted += len(done)
        return posted, False

    async def _headline(self, channel: str, new: list[tuple[OpsRequest | None, list[dict[str, Any]]]]) -> str:
        """Post the headline of requests that have none yet; returns its ts. One request gets a
        message of its own; several new in one backlog share one (each with its own headline
        lines, so every approval card still links to its record): Slack's pace per channel, not
        opsbot, decides how fast a backlog drains. Each shows its group's last row, so it needs no
        update for the rows posted with it."""
        parts = []
        for request, group in new:
            assert request is not None
            parts.append(audit_headline(request, group[-1], await self._card_link(request)))
        first = new[0][0]
        assert first is not None
        ts = await self._deliver(channel=channel, text="\n\n".join(parts), thread_ts=None, needle=f"`{first.id}`",
                           uncertain=any(g[0]["uncertain"] for _, g in new))
        link = await self.permalinks.get(channel, ts)
        shown: list[tuple[str, int]] = [(request.id, int(group[-1]["seq"])) for request, group in new if request is not None]
        await self.audit.log.save_threads(channel, ts, link, shown)
        await self.store.touch_cards([r for r, _ in shown])  # the approval cards now link to their audit record
        return ts

    async def _deliver(self, **message: Any) -> str:
        """``deliver``, waiting out a short "not now" from Slack (429, Retry-After) within the round.
        Slack took nothing, so posting again is safe. Ending the round instead (rows marked failed,
        the round started again after the wait) cost a round per message: the batch read again and a
        round posts into several threads, so each round got one message through before the next 429,
        and Slack's pace of ~1 message/s became ~0.6 while the messages stayed small."""
        for _ in range(RATE_LIMIT_WAITS):
            try:
                return await deliver(self.chat, **message)
            except RateLimited as exc:
                if self._stopping or exc.retry_after > RATE_LIMIT_WAIT:
                    raise
                await asyncio.sleep(exc.retry_after)
        return await deliver(self.chat, **message)

    async def _failed(self, rows: list[dict[str, Any]], exc: OpsbotError) -> None:
        """The rows of a message Slack did not take: each tried again later, or given up on. Rows
        with the same history are marked in one statement (a message holds hundreds of rows)."""
        self._held_back = True
        alike: dict[tuple[int, bool, bool], list[int]] = {}
        for row in rows:
            attempts = int(row["attempts"]) + 1
            uncertain = bool(row["uncertain"]) or isinstance(exc, DeliveryUncertain)
            give_up = permanent(exc) or (uncertain and attempts >= MAX_UNCERTAIN)
            alike.setdefault((attempts, uncertain, give_up), []).append(int(row["seq"]))
        for (attempts, uncertain, give_up), seqs in alike.items():
            shown = _seq_range(seqs)
            if give_up:
                # The rows stay in the database (the record); only their copy in the channel is
                # missing, which `opsbot audit verify --against-channel` reports.
                log.error("audit row(s) %s will not be posted to the audit channel (after %d attempt(s)): %s", shown, attempts, exc)
                if self.metrics:
                    self.metrics.given_up.labels("audit").inc(len(seqs))
            else:
                log.warning("audit row(s) %s not posted yet: %s", shown, exc)
            await self.audit.log.mark_failed_many(seqs, str(exc), uncertain=uncertain, delay=retry_delay(attempts, exc),
                                                  give_up=give_up)

    async def _card_link(self, request: OpsRequest | None) -> str | None:
        if request and request.card_channel and request.card_ts:
            return await self.permalinks.get(request.card_channel, request.card_ts)
        return None

    async def _headlines(self, channel: str) -> None:
        """Each request's headline follows its last posted row (state, last hash). A failed update
        is simply tried again next round: the headline is behind, never lost. A message that is the
        headline of several requests is drawn again whole, each request as it is now."""
        messages: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for behind in await self.audit.log.stale_headlines():
            messages.setdefault((str(behind["channel"]), str(behind["ts"])), []).append(behind)
        # The members of every message to draw again, their requests and their last rows: three
        # queries in all, not three per member.
        members = await self.audit.log.members_of(list(messages))
        requests = await self.store.get_many(list({m["request_id"] for found in members.values() for m in found}))
        for (message_channel, ts), stale in messages.items():
            parts = []
            for member in members.get((message_channel, ts), []):
                request, last = requests.get(member["request_id"]), member["row"]
                if request is not None and last is not None:
                    parts.append(audit_headline(request, last, await self._card_link(request)))
            if not parts:  # its rows (or its request) are gone, pruned: nothing to draw, and not behind any more
                await self.audit.log.headlines_shown([(item["request_id"], item["seq"]) for item in stale])
                continue
            try:
                await self.chat.update_message(channel_id=message_channel, ts=ts, text="\n\n".join(parts))
            except OpsbotError as exc:
                log.warning("audit headline of %s not updated yet: %s", ", ".join(item["request_id"] for item in stale), exc)
                return
            await self.audit.log.headlines_shown([(item["request_id"], item["seq"]) for item in stale])

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                while await self.run_once() and not self._stopping:
                    pass  # drain continuously while there is a backlog
            except BackendUnavailable as exc:  # an outage is expected, and said once per try, without a traceback
                log.warning("audit poster: %s; will try again", exc)
            except Exception:
                log.exception("audit poster failed; will try again")
            # Rows not due yet (Slack said to wait, or a retry's backoff) are waited for, not polled:
            # each new row wakes the loop, but while Slack said to wait it only waits on.
            wait = self.interval
            with contextlib.suppress(Exception):
                wait = min(wait, max(0.05, await self.audit.log.next_due_in()))
            pause_until = time.monotonic() + wait
            while (left := pause_until - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.audit.appended.wait(), timeout=left)
                self.audit.appended.clear()
                if not self._held_back or self._stopping:
                    break
            self._held_back = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self, grace: float = 5.0) -> None:
        """Let the round in progress finish (bounded by ``grace``), then one last round. Cancelling a
        round mid-post could leave a message Slack took with its rows not marked posted, and the
        last round (or another replica) would post them again."""
        await stop_loop(self._task, grace, wake=self._stop_flag)
        with contextlib.suppress(Exception):  # a last try, so a clean shutdown leaves nothing behind
            await self.run_once()

    def _stop_flag(self) -> None:
        self._stopping = True
        self.audit.appended.set()
