"""`kind: flag` (issue 10): a maintenance flag in a database row, a feature flag named by a parameter, a
mode kept in a Redis key; through signed Slack requests, approval, the worker's stale check, and the
automatic revert (`revert_after`) run by the sweeper, with time moved by editing `scheduled_reverts`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest_asyncio
import redis.asyncio as aioredis

from bot.domain import OpsRequest
from bot.sandbox.slack_api import FakeSlack
from bot.worker import ActionWorker
from tests.actions_support import config_with_actions
from tests.conftest import ALICE, CAROL
from tests.faults.proxy import TcpProxy
from tests.harness import Harness

ACTIONS = """
maintenance:
  kind: flag
  summary: Maintenance mode of the public API
  database: app
  table: feature_flags
  value_column: enabled
  key: maintenance
  values: {"on": true, "off": false}
  revert_after: 30m
feature:
  kind: flag
  words: feature flag
  summary: A feature flag
  database: app
  table: feature_flags
  value_column: enabled
  key: "{name}"
  params: {name: {type: enum, values: [checkout, search]}}
  values: {"on": true, "off": false}
cache-mode:
  kind: flag
  words: cache mode
  summary: How the API reads its cache
  redis: cache
  key: "PREFIX:cache-mode"
  values: {fast: "fast", safe: "safe"}
  revert_after: 2m
"""
FLAGS = """CREATE TABLE feature_flags (key text PRIMARY KEY, enabled boolean NOT NULL);
           INSERT INTO feature_flags VALUES ('maintenance', false), ('checkout', false), ('search', true)"""


@pytest_asyncio.fixture
async def flags_db(platform_db: str) -> str:
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute(FLAGS)
    return platform_db


async def start(slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str, queue_prefix: str, app_db: str) -> Harness:
    config = config_with_actions(app_db, redis_url, queue_prefix, ACTIONS.replace("PREFIX", queue_prefix))
    return await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                               queue_prefix=queue_prefix)


@pytest_asyncio.fixture
async def bot(flags_db: str, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str,
              queue_prefix: str) -> AsyncIterator[Harness]:
    h = await start(slack, state_db, redis_url, kubeconfig, queue_prefix, flags_db)
    h.runtime.worker.sweep_every = 3600  # the tests run the sweeper's revert step themselves
    yield h
    await asyncio.wait_for(h.stop(), timeout=60)


def flag(db: str, key: str) -> bool:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT enabled FROM feature_flags WHERE key = %s", (key,)).fetchone()
    assert row is not None
    return bool(row[0])


def set_flag(db: str, key: str, value: bool) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE feature_flags SET enabled = %s WHERE key = %s", (value, key))


def reverts(state_db: str) -> list[dict[str, Any]]:
    with psycopg.connect(state_db, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM scheduled_reverts ORDER BY created_at").fetchall()


def make_due(state_db: str, request_id: str) -> None:
    """Thirty minutes pass: the revert is due (and its announcement was due five minutes before)."""
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE scheduled_reverts SET due_at = now() - interval '1 second', announce_at = now() - interval '5 minutes', "
                     "next_attempt_at = now() WHERE request_id = %s", (request_id,))


def thread(bot: Harness, request: OpsRequest) -> list[str]:
    return [m.text for m in bot.slack.thread(request.card_channel or "", request.card_ts or "")]


def card(bot: Harness, request: OpsRequest) -> str:
    return next(m.all_text() for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == request.card_ts)


async def newer(bot: Harness, old_id: str | None) -> OpsRequest:
    async def probe() -> OpsRequest | None:
        r = await bot.last_request()
        return r if r is not None and r.id != old_id and r.card_ts else None
    return await bot.eventually(probe, what="a new request")


async def approved_run(bot: Harness, text: str, old_id: str | None = None) -> OpsRequest:
    await bot.slash(ALICE, text)
    request = await newer(bot, old_id)
    await bot.click(CAROL, request.id)
    return await bot.state_of(request.id, "succeeded", "failed", "stale", "unknown")


async def told(bot: Harness, request: OpsRequest, part: str) -> str:
    async def probe() -> str | None:
        return next((t for t in thread(bot, request) if part in t), None)
    return await bot.eventually(probe, what=f"{part!r} in the thread")


# ---------------------------------------------------------------------------------------------- on/off


async def test_a_database_flag_on_then_off_through_approval(bot: Harness, flags_db: str, state_db: str) -> None:
    await bot.slash(ALICE, "/ops feature flag checkout on")
    request = await bot.requested()
    shown = card(bot, request)
    assert "feature flag checkout: off → on" in shown
    assert "table `feature_flags`, column `enabled` where `key` = `checkout`" in shown
    assert request.plan["target"] == "flag/db/app/feature_flags/checkout"
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert flag(flags_db, "checkout") is True and flag(flags_db, "search") is True
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "succeeded"]
    assert "feature flag checkout set to on (was off)" in await told(bot, done, "Done")
    assert reverts(state_db) == []  # no revert_after: nothing scheduled

    off = await approved_run(bot, "/ops feature flag checkout OFF", request.id)
    assert off.state.value == "succeeded", off.error
    assert flag(flags_db, "checkout") is False


async def test_a_redis_flag_from_not_set_to_a_value_and_on(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    key = f"{queue_prefix}:cache-mode"
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await bot.slash(ALICE, "/ops cache mode safe")
        request = await bot.requested()
        assert "cache mode: (not set) → safe" in card(bot, request)
        assert f"Redis `cache`, key `{key}`" in card(bot, request)
        await bot.click(CAROL, request.id)
        done = await bot.state_of(request.id, "succeeded", "failed", "stale")
        assert done.state.value == "succeeded", done.error
        assert await r.get(key) == "safe"
        fast = await approved_run(bot, "/ops cache mode fast", request.id)
        assert fast.state.value == "succeeded", fast.error
        assert await r.get(key) == "fast"
        assert "cache mode: safe → fast" in fast.plan["summary"]
    finally:
        await r.delete(key)
        await r.aclose()


async def test_a_redis_flag_is_announced_at_once_and_put_back_to_not_set(bot: Harness, redis_url: str, queue_prefix: str,
                                                                         state_db: str) -> None:
    key = f"{queue_prefix}:cache-mode"
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        done = await approved_run(bot, "/ops cache mode safe")
        assert done.state.value == "succeeded", done.error
        assert "It will be put back to (not set) at" in await told(bot, done, "Done")
        assert await bot.runtime.worker.reverts.run_due() == 0  # 2m is short: announced at once, not yet done
        assert "cache mode will be put back to (not set) in 2 minutes" in await told(bot, done, "hourglass")
        assert await r.get(key) == "safe"
        make_due(state_db, done.id)
        assert await bot.runtime.worker.reverts.run_due() == 1
        assert await r.exists(key) == 0
        assert "cache mode put back to (not set)" in await told(bot, done, "put back to (not set) (")
    finally:
        await r.delete(key)
        await r.aclose()


async def test_already_on_is_a_clear_no_op(bot: Harness, flags_db: str) -> None:
    await bot.slash(ALICE, "/ops feature flag search on")
    reply = await bot.response(containing="already")
    assert "feature flag search is already on; nothing to do." in reply["text"]
    assert await bot.last_request() is None


async def test_a_missing_row_says_which_table_and_key(bot: Harness, flags_db: str) -> None:
    with psycopg.connect(flags_db, autocommit=True) as conn:
        conn.execute("DELETE FROM feature_flags WHERE key = 'search'")
    await bot.slash(ALICE, "/ops feature flag search off")
    reply = await bot.response(containing="no row")
    assert "table `feature_flags`" in reply["text"] and "`key` = `search`" in reply["text"]


async def test_changed_after_the_card_is_stale_and_not_overwritten(bot: Harness, flags_db: str) -> None:
    await bot.slash(ALICE, "/ops feature flag checkout on")
    request = await bot.requested()
    set_flag(flags_db, "checkout", True)  # someone else, by hand
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert "already on" in (done.error or "")
    set_flag(flags_db, "checkout", False)  # and back: the same value as on the card again, the request is run
    await bot.slash(ALICE, "/ops feature flag checkout on")
    second = await newer(bot, request.id)
    with psycopg.connect(flags_db, autocommit=True) as conn:  # a third value is a change too: NULL is not off
        conn.execute("ALTER TABLE feature_flags ALTER COLUMN enabled DROP NOT NULL")
        conn.execute("UPDATE feature_flags SET enabled = NULL WHERE key = 'checkout'")
    await bot.click(CAROL, second.id)
    stale = await bot.state_of(second.id, "succeeded", "failed", "stale")
    assert stale.state.value == "stale", stale.error
    with psycopg.connect(flags_db) as conn:
        assert conn.execute("SELECT enabled FROM feature_flags WHERE key = 'checkout'").fetchone() == (None,)


async def test_hostile_values_are_refused_and_change_nothing(bot: Harness, flags_db: str) -> None:
    for text, answer in (("maintenance o\x00n", "U+0000 NULL"),
                         ("maintenance " + "on" * 100_000, "opsbot reads at most 2,000"),
                         ("maintenance " + "o" * 1_500, "… (1,500 characters)` is not a value of maintenance"),
                         ("maintenance оn", "CYRILLIC SMALL LETTER O"),  # a Cyrillic о
                         ("maintenance ｏｎ", "FULLWIDTH LATIN SMALL LETTER O"),
                         ("maintenance enabled", "type one of `on`, `off`"),
                         ("maintenance on'; DROP TABLE feature_flags; --", "a quote is not closed"),
                         ("maintenance \"on'; DROP TABLE feature_flags; --\"", "is not a value of maintenance"),
                         ("feature flag ../checkout on", "is not one of `checkout`, `search`"),
                         ("feature flag checkout%2F on", "is not one of `checkout`, `search`")):
        status, body = await bot.slash(ALICE, "/ops " + text)
        assert status == 200 and answer in body, (text[:40], body[:300])
        assert len(body) < 2000
    assert await bot.last_request() is None
    assert flag(flags_db, "maintenance") is False and flag(flags_db, "checkout") is False


async def test_the_usage_lists_the_words(bot: Harness) -> None:
    _, body = await bot.slash(ALICE, "/ops maintenance")
    assert "`maintenance` needs the value" in body and "/ops maintenance <on|off>" in body


# ---------------------------------------------------------------------------------------------- revert_after


async def test_revert_after_is_announced_then_done_once_by_two_racing_replicas(
        bot: Harness, flags_db: str, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str, queue_prefix: str) -> None:
    await bot.slash(ALICE, "/ops maintenance on")
    request = await bot.requested()
    assert "will be put back to off after 30m" in card(bot, request)
    assert "no second approval" in card(bot, request)
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert flag(flags_db, "maintenance") is True
    assert "It will be put back to off at" in await told(bot, done, "Done")
    [row] = reverts(state_db)
    assert row["request_id"] == request.id and row["done_at"] is None
    assert timedelta(minutes=29) < row["due_at"] - row["created_at"] <= timedelta(minutes=31)

    worker = bot.runtime.worker
    assert await worker.reverts.run_due() == 0  # not due yet, not announced yet (25 minutes to go)
    assert "revert_announced" not in await bot.audit_events(request.id)

    with psycopg.connect(state_db, autocommit=True) as conn:  # 25 minutes pass: announced, not reverted
        conn.execute("UPDATE scheduled_reverts SET announce_at = now(), due_at = now() + interval '5 minutes'")
    await worker.reverts.run_due()
    await worker.reverts.run_due()
    assert "will be put back to off in 5 minutes (auto-revert of" in await told(bot, done, "hourglass")
    assert (await bot.audit_events(request.id)).count("revert_announced") == 1
    assert flag(flags_db, "maintenance") is True

    # A second replica, with its own worker, sweeping at the same moment as the first.
    other = await start(slack, state_db, redis_url, kubeconfig, queue_prefix, flags_db)
    other.runtime.executor.worker_id = "replica-2"
    try:
        make_due(state_db, request.id)
        claimed = await asyncio.gather(worker.reverts.run_due(), other.runtime.worker.reverts.run_due(),
                                       worker.reverts.run_due())
    finally:
        await asyncio.wait_for(other.stop(), timeout=60)
    assert sum(claimed) == 1
    assert flag(flags_db, "maintenance") is False
    events = await bot.audit_events(request.id)
    assert events.count("reverted") == 1 and "revert_skipped" not in events
    [row] = reverts(state_db)
    assert row["outcome"] == "reverted" and row["done_at"] is not None
    assert "maintenance put back to off (auto-revert of" in await told(bot, done, "put back to off (")
    trail = [r for r in await bot.runtime.audit.log.rows(request.id) if r["event"] == "reverted"]
    assert trail[0]["actor_id"] == "opsbot"

    async def card_says() -> bool:
        return "Auto-revert: maintenance put back to off" in card(bot, done)
    assert await bot.eventually(card_says, what="the card to tell the revert")
    assert await worker.reverts.run_due() == 0  # done is done


async def test_revert_is_skipped_when_someone_changed_the_flag(bot: Harness, flags_db: str, state_db: str) -> None:
    with psycopg.connect(flags_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE feature_flags ALTER COLUMN enabled DROP NOT NULL")
    done = await approved_run(bot, "/ops maintenance on")
    assert done.state.value == "succeeded", done.error
    with psycopg.connect(flags_db, autocommit=True) as conn:
        conn.execute("UPDATE feature_flags SET enabled = NULL WHERE key = 'maintenance'")  # by hand, outside opsbot
    make_due(state_db, done.id)
    assert await bot.runtime.worker.reverts.run_due() == 1
    text = await told(bot, done, "was NOT put back")
    assert "someone changed it since this request set it to on; it is `None` now" in text
    with psycopg.connect(flags_db) as conn:
        assert conn.execute("SELECT enabled FROM feature_flags WHERE key = 'maintenance'").fetchone() == (None,)
    events = await bot.audit_events(done.id)
    assert events.count("revert_skipped") == 1 and "reverted" not in events
    assert reverts(state_db)[0]["outcome"] == "skipped"


async def test_switching_off_early_ends_the_revert_and_schedules_none(bot: Harness, flags_db: str, state_db: str) -> None:
    on = await approved_run(bot, "/ops maintenance on")
    assert on.state.value == "succeeded", on.error
    off = await approved_run(bot, "/ops maintenance off", on.id)
    assert off.state.value == "succeeded", off.error
    assert "auto-revert is cancelled" in await told(bot, off, "Done")
    assert "Auto-revert of `" in await told(bot, on, "cancelled")
    rows = reverts(state_db)
    assert [(r["request_id"], r["outcome"]) for r in rows] == [(on.id, "superseded")]
    make_due(state_db, on.id)
    assert await bot.runtime.worker.reverts.run_due() == 0
    assert flag(flags_db, "maintenance") is False
    assert "revert_superseded" in await bot.audit_events(on.id)


async def test_database_down_at_revert_time_is_retried_not_lost(flags_db: str, slack: FakeSlack, state_db: str, redis_url: str,
                                                                kubeconfig: str, queue_prefix: str) -> None:
    proxy, via_proxy = await TcpProxy.for_url(flags_db)
    bot = await start(slack, state_db, redis_url, kubeconfig, queue_prefix, via_proxy)
    bot.runtime.worker.sweep_every = 3600
    reverts_step = bot.runtime.worker.reverts
    reverts_step.retry_every = 0.5
    try:
        proxy.down()  # at plan time: refused, saying why, nothing asked
        await bot.slash(ALICE, "/ops maintenance on")
        reply = await bot.response(containing="unavailable")
        assert "database `app`" in reply["text"] and await bot.last_request() is None
        proxy.up()
        done = await approved_run(bot, "/ops maintenance on")
        assert done.state.value == "succeeded", done.error
        proxy.down()
        make_due(state_db, done.id)
        for _ in range(3):  # three sweeps while it is down: told once, kept every time
            assert await reverts_step.run_due() <= 1
            await asyncio.sleep(0.6)
        text = await told(bot, done, "could not be put back to off yet")
        assert "the revert is not dropped" in text
        assert sum("could not be put back" in t for t in thread(bot, done)) == 1
        assert (await bot.audit_events(done.id)).count("revert_delayed") == 1
        [row] = reverts(state_db)
        assert row["done_at"] is None and row["claimed_by"] is None and row["attempts"] >= 2
        assert flag(flags_db, "maintenance") is True

        proxy.up()
        await asyncio.sleep(0.6)
        assert await reverts_step.run_due() == 1
        assert flag(flags_db, "maintenance") is False
        assert (await bot.audit_events(done.id)).count("reverted") == 1
        assert reverts(state_db)[0]["outcome"] == "reverted"
    finally:
        proxy.up()
        await asyncio.wait_for(bot.stop(), timeout=60)
        await proxy.stop()


async def test_the_sweeper_loop_runs_due_reverts(bot: Harness, flags_db: str, state_db: str) -> None:
    done = await approved_run(bot, "/ops maintenance on")
    assert done.state.value == "succeeded", done.error
    make_due(state_db, done.id)
    worker: ActionWorker = bot.runtime.worker
    await worker.sweep()
    assert flag(flags_db, "maintenance") is False
