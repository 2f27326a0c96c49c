"""Stopping a replica while its posters are in the middle of a Slack call (a rolling deploy's
SIGTERM): the round in progress finishes and records what Slack took, so nothing is posted twice.
Found by tests/scenarios/test_replicas.py, where a stopped server's audit line appeared twice."""

from __future__ import annotations

import asyncio

from tests.conftest import ALICE, CAROL
from tests.harness import Harness


async def _posting(bot: Harness, channel: str, before: int) -> bool:
    return len([a for m, a in bot.slack.calls[before:] if m == "chat.postMessage" and a.get("channel") == channel]) > 0


async def test_audit_poster_stopped_mid_post_posts_each_line_once(bot: Harness) -> None:
    bot.slack.slow_methods["chat.postMessage"] = 1.0  # Slack takes the post at once but answers a second later
    before = len(bot.slack.calls)
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    await bot.eventually(lambda: _posting(bot, "C0AUDIT", before), what="the audit headline being posted")
    await bot.runtime.poster.stop()  # SIGTERM now: the post is in flight
    bot.slack.slow_methods.clear()
    heads = [m for m in bot.slack.in_channel("C0AUDIT") if request.id in m.text and m.thread_ts is None]
    lines = [line for m in bot.slack.messages if m.channel == "C0AUDIT" for line in m.text.splitlines() if line.startswith("`#")]
    rows = await bot.runtime.audit.log.rows()
    assert len(heads) == 1, "one headline: " + "\n".join(m.text for m in heads)
    assert rows and len(lines) == len(set(lines)) == len(rows), "each audit line once: " + "\n".join(lines)
    assert await bot.runtime.audit.log.unposted() == 0, "what Slack took is marked posted"


async def test_thread_poster_stopped_mid_post_posts_each_reply_once(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    await bot.eventually(lambda: _card(bot, request.id), what="the card")
    bot.slack.slow_methods["chat.postMessage"] = 1.0
    before = len(bot.slack.calls)
    await bot.click(CAROL, request.id)
    await bot.eventually(lambda: _posting(bot, "C0INCIDENT", before), what="a thread reply being posted", timeout=15)
    await bot.runtime.notices.stop()
    bot.slack.slow_methods.clear()
    await asyncio.sleep(0.2)
    replies = [m.text for m in bot.slack.messages if m.channel == "C0INCIDENT" and m.thread_ts]
    assert replies and len(replies) == len(set(replies)), "each thread reply once: " + "\n".join(replies)


async def _card(bot: Harness, request_id: str) -> bool:
    request = await bot.runtime.store.get(request_id)
    return bool(request and request.card_ts)
