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
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from bot.adapters.audit_log import AuditLog
from bot.adapters.store import Store
from bot.domain import Actor
from bot.errors import DeliveryUncertain, OpsbotError
from bot.messages import audit_headline, audit_line
from bot.ports import Chat

log = logging.getLogger(__name__)

_SECRET_KEYS = ("token", "secret", "password", "authorization", "dsn", "credential")


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
    def __init__(self, log: AuditLog, *, audit_channel: str | None, secrets: tuple[str, ...] = ()) -> None:
        self.log, self.audit_channel, self.secrets = log, audit_channel, secrets
        self.appended = asyncio.Event()  # wakes the poster

    async def record(self, event: str, *, actor: Actor, channel_id: str = "", request_id: str | None = None,
                     text: str = "", plan: dict[str, Any] | None = None, result: dict[str, Any] | None = None,
                     post: bool = True) -> dict[str, Any]:
        row = await self.log.append(event=event, actor=actor, channel_id=channel_id, request_id=request_id,
                                    command_text=redact(text, self.secrets), plan=redact(plan, self.secrets),
                                    result=redact(result, self.secrets), post=post and bool(self.audit_channel))
        self.appended.set()
        return row


class AuditPoster:
    """Copies the outbox to the audit channel, in order, at most once per row."""

    def __init__(self, *, audit: Audit, store: Store, chat: Chat, interval: float = 2.0) -> None:
        self.audit, self.store, self.chat, self.interval = audit, store, chat, interval
        self._task: asyncio.Task[None] | None = None

    @property
    def channel(self) -> str | None:
        return self.audit.audit_channel

    async def run_once(self) -> int:
        """Post what is due; returns how many rows were posted. Stops at the first failure so that
        a request's steps never appear out of order."""
        if not self.channel:
            return 0
        posted = 0
        async with await self.audit.log.poster_lock() as mine:
            if not mine:  # another replica is posting
                return 0
            for row in await self.audit.log.due_posts():
                try:
                    await self._post(self.channel, row)
                except OpsbotError as exc:
                    await self.audit.log.mark_failed(row["seq"], str(exc), uncertain=isinstance(exc, DeliveryUncertain))
                    log.warning("audit row %s not posted yet: %s", row["seq"], exc)
                    break
                posted += 1
        return posted

    async def _post(self, channel: str, row: dict[str, Any]) -> None:
        request_id = row["request_id"]
        if not request_id:
            ts = await self._once(channel, row, audit_line(row), None)
            await self.audit.log.mark_posted(row["seq"], ts)
            return
        request = await self.store.get(request_id)
        thread = await self.audit.log.thread(request_id)
        card_link = None
        if request and request.card_channel and request.card_ts:
            card_link = await self.chat.permalink(channel_id=request.card_channel, ts=request.card_ts)
        if thread is None:
            assert request is not None
            headline = audit_headline(request, row, card_link)
            ts = await self._once(channel, row, headline, None, needle=f"`{request_id}`")
            await self.audit.log.save_thread(request_id, channel, ts, await self.chat.permalink(channel_id=channel, ts=ts))
            thread = await self.audit.log.thread(request_id)
            assert thread is not None
            linked = await self.store.get(request_id)
            if linked is not None:  # the approval card now links to its audit record
                with contextlib.suppress(OpsbotError):
                    await self.chat.update_card(linked)
        ts = await self._once(channel, row, audit_line(row), thread["ts"])
        await self.audit.log.mark_posted(row["seq"], ts)
        if request is not None:
            with contextlib.suppress(OpsbotError):  # the headline follows the state; best effort
                await self.chat.update_message(channel_id=channel, ts=thread["ts"], text=audit_headline(request, row, card_link))

    async def _once(self, channel: str, row: dict[str, Any], text: str, thread_ts: str | None, *, needle: str | None = None) -> str:
        """Post unless an earlier, uncertain attempt already got through."""
        if row.get("uncertain"):
            found = await self.chat.find_message(channel_id=channel, needle=needle or row["hash"], thread_ts=thread_ts)
            if found:
                return found
        return await self.chat.post_message(channel_id=channel, text=text, thread_ts=thread_ts)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("audit poster failed; will try again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.audit.appended.wait(), timeout=self.interval)
            self.audit.appended.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # a last try, so a clean shutdown leaves nothing behind
            await self.run_once()
