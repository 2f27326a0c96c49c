"""What the incident channel is told about a request, eventually right: the approval card's state
and the replies in its thread, through an outbox in PostgreSQL.

A request's state lives in PostgreSQL; Slack only shows it. Sending each card update and thread
reply once and forgetting it on failure left channels wrong after a Slack outage (a request that
succeeded kept a card saying "waiting for approval", its "Done" never appeared). So:

* **Cards: latest state wins.** Every change a card shows bumps ``ops_requests.card_version`` in the
  same statement (a trigger; counted votes and a new audit link bump it explicitly). The poster
  re-renders cards that are behind (``card_version > card_shown``) from the row as it is *now* and
  records the version it showed. Ten changes during an outage become one update afterwards.
* **Thread replies: every one, once, in order.** ``chat_outbox`` rows are posted oldest first; a
  channel whose oldest reply failed (or is waiting for its retry time) holds back the replies after
  it, so a thread never reads out of order. Other channels go on.
* **At most once.** A post whose answer was lost (a timeout after sending) is *uncertain*: before
  posting it again the poster looks for it in the thread (``conversations.replies``, scope
  ``channels:history``/``groups:history``). If it cannot look (scope missing), it posts again, but
  an uncertain reply is given up after ``MAX_UNCERTAIN`` tries, so a post that keeps arriving late is
  never repeated without bound.
* **Slack's pace.** A 429's ``Retry-After`` sets the next attempt (``RateLimited``); other temporary
  failures back off exponentially up to five minutes; permanent ones (channel gone, message
  deleted, not in channel) give up and say so in the log and in ``opsbot_messages_given_up_total``.

One replica posts at a time (a session advisory lock), which keeps each channel's order across
replicas; the others' wake-ups find the lock taken and leave the rows to the holder, who drains
until nothing is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from bot.adapters.store import Store
from bot.domain import OpsRequest
from bot.errors import BackendUnavailable, DeliveryUncertain, ExecutionError, OpsbotError, RateLimited
from bot.metrics import Metrics
from bot.ports import Chat, tell
from bot.redaction import scrub_text

log = logging.getLogger(__name__)

MAX_UNCERTAIN = 3  # posts whose answer was lost, before giving up on one message
MAX_BACKOFF = 300.0
_LOCK = "opsbot-notices-poster"


def retry_delay(attempts: int, exc: OpsbotError) -> float:
    """Seconds until the next attempt after ``attempts`` failures (this one included)."""
    if isinstance(exc, RateLimited):
        return exc.retry_after
    return min(MAX_BACKOFF, 2.0 ** max(0, attempts - 1))


def permanent(exc: OpsbotError) -> bool:
    return isinstance(exc, ExecutionError) and not exc.temporary


async def deliver(chat: Chat, *, channel: str, text: str, thread_ts: str | None, needle: str, uncertain: bool,
                  undo: str | None = None) -> str:
    """Post ``text`` unless an earlier, uncertain attempt already got through; returns its ts.
    ``needle`` identifies the message among its neighbours (a row hash, the reply's text)."""
    if uncertain:
        try:
            found = await chat.find_message(channel_id=channel, needle=needle, thread_ts=thread_ts)
        except ExecutionError as exc:
            if exc.temporary:
                raise
            log.warning("cannot check whether an uncertain post arrived (%s); posting again (bounded)", exc)
            found = None
        if found:
            return found
    if undo:  # the Undo button of request ``undo`` goes with it (bot/undo.py)
        return await chat.post_message(channel_id=channel, text=text, thread_ts=thread_ts, undo=undo)
    return await chat.post_message(channel_id=channel, text=text, thread_ts=thread_ts)


async def stop_loop(task: asyncio.Task[None] | None, grace: float, *, wake: Callable[[], None]) -> None:
    """Stop a poster's loop between rounds: ``wake`` sets its stop flag and wakes it; a round still
    running after ``grace`` seconds (Slack hanging) is cancelled."""
    if task is None or task.done():
        return
    wake()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        log.warning("a poster did not finish its round within %s s; stopping it mid-round", grace)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Notices:
    """The incident channel's outbox: ``thread()`` and ``card_changed()`` are what the request
    lifecycle calls; ``run_once()``/``start()`` post."""

    def __init__(self, *, store: Store, chat: Chat, metrics: Metrics, interval: float = 1.0, secrets: tuple[str, ...] = ()) -> None:
        self.store, self.chat, self.metrics, self.interval = store, chat, metrics, interval
        self.secrets = secrets  # scrubbed from every thread notice (an error or an answer may quote one)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---------------------------------------------------------------- what the lifecycle says

    async def thread(self, request: OpsRequest, text: str, *, undo_button: bool = False) -> None:
        """A reply in the request's card thread, delivered eventually. If the outbox itself cannot
        be written (the database went away just after the state change), it is sent directly,
        best effort: the state is already recorded, and the card will show it when it is back."""
        text = scrub_text(text, self.secrets)
        try:
            await self.store.add_thread_notice(request.id, text, undo_button=request.id if undo_button else None)
        except BackendUnavailable as exc:
            log.warning("thread notice for %s not kept (%s); sending it directly", request.id, exc)
            await tell(self.chat.post_in_thread(request, text))
            return
        self._wake.set()

    def card_changed(self) -> None:
        """The request row changed (its card_version was bumped with it): post soon."""
        self._wake.set()

    # ---------------------------------------------------------------- posting

    async def run_once(self) -> int:
        """Bring cards up to date and post due thread replies; returns how many Slack calls worked."""
        async with self.store.target_lock(_LOCK, wait=0) as mine:
            if not mine:
                return 0
            return await self._cards() + await self._threads()

    async def _cards(self) -> int:
        done = 0
        for request_id in await self.store.cards_behind():
            request = await self.store.get(request_id)
            if request is None:
                continue
            try:
                await self.chat.update_card(request)
            except OpsbotError as exc:
                attempts = await self._card_attempts(request_id)
                give_up = permanent(exc)
                if give_up:
                    self.metrics.given_up.labels("card").inc()
                    log.error("card of %s cannot be updated and is given up: %s", request_id, exc)
                else:
                    log.warning("card of %s not updated yet: %s", request_id, exc)
                await self.store.card_failed(request_id, str(exc), delay=retry_delay(attempts, exc),
                                             give_up_version=request.card_version if give_up else None)
                if isinstance(exc, RateLimited):
                    break  # chat.update is paused for everyone
                continue
            await self.store.card_shown(request_id, request.card_version)
            done += 1
        return done

    async def _card_attempts(self, request_id: str) -> int:
        async with self.store.connection() as conn:
            row = await (await conn.execute("SELECT card_attempts FROM ops_requests WHERE id = %s", (request_id,))).fetchone()
        return int(row["card_attempts"]) + 1 if row else 1

    async def _threads(self) -> int:
        done = 0
        held: set[str] = set()  # channels whose oldest reply is not posted: the rest of them waits
        for notice in await self.store.due_thread_notices():
            channel = str(notice["channel"])
            if channel in held:
                continue
            if not notice["due"]:
                held.add(channel)
                continue
            try:
                ts = await deliver(self.chat, channel=channel, text=notice["text"], thread_ts=notice["thread_ts"],
                                   needle=notice["text"][:200], uncertain=notice["uncertain"], undo=notice.get("undo_button"))
            except OpsbotError as exc:
                await self._failed(notice, exc)
                held.add(channel)
                if isinstance(exc, RateLimited):
                    break
                continue
            await self.store.thread_notice_posted(notice["id"], ts)
            done += 1
        return done

    async def _failed(self, notice: dict[str, Any], exc: OpsbotError) -> None:
        attempts = int(notice["attempts"]) + 1
        uncertain = bool(notice["uncertain"]) or isinstance(exc, DeliveryUncertain)
        give_up = permanent(exc) or (uncertain and attempts >= MAX_UNCERTAIN)
        if give_up:
            self.metrics.given_up.labels("thread").inc()
            log.error("thread reply %s for %s given up after %d attempt(s): %s", notice["id"], notice["request_id"], attempts, exc)
        else:
            log.warning("thread reply %s for %s not posted yet: %s", notice["id"], notice["request_id"], exc)
        await self.store.thread_notice_failed(notice["id"], str(exc), uncertain=uncertain, delay=retry_delay(attempts, exc),
                                              give_up=give_up)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                while await self.run_once() and not self._stopping:
                    pass  # drain while there is work
            except BackendUnavailable as exc:  # an outage is expected: said without a traceback
                log.warning("notices poster: %s; will try again", exc)
            except Exception:
                log.exception("notices poster failed; will try again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            self._wake.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self, grace: float = 5.0) -> None:
        """Let the round in progress finish (bounded by ``grace``; cancelling it mid-post could post a
        reply twice), then one last round, so a clean shutdown leaves nothing behind."""
        def flag() -> None:
            self._stopping = True
            self._wake.set()
        await stop_loop(self._task, grace, wake=flag)
        with contextlib.suppress(Exception):  # a last try, so a clean shutdown leaves nothing behind
            await self.run_once()
