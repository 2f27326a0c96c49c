"""`kind: sql` actions end to end, through signed Slack requests against real PostgreSQL (and Redis
for `enqueue:`): the card shows the plan query's rows, the stale check covers them, the row count is
enforced, values are bound (never SQL), and a backend that is down or slow leaves nothing half-done.
The last tests write webhook replay (a built-in) as a sql action with `enqueue:` and show the same
behaviour, down to a Node BullMQ worker taking the job."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from bullmq import Queue

from bot.config import Config
from bot.sandbox.slack_api import FakeSlack
from tests.actions_support import config_with_actions
from tests.conftest import ALICE, CAROL, DAN, FAILED_EVENT
from tests.faults.proxy import TcpProxy
from tests.harness import Harness

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
PENDING_EVENT = "2b7c9d11-bbbb-4ccc-9ddd-000000000003"
ACTIONS = """
retry-event:
  kind: sql
  words: event retry
  summary: Put a failed webhook event back to pending
  database: app
  params: {event_id: {type: uuid}}
  plan: {query: "SELECT id, status, last_error FROM billing_webhook_events WHERE id = {event_id}"}
  statement: "UPDATE billing_webhook_events SET status = 'pending', last_error = NULL WHERE id = {event_id} AND status = 'failed'"
  expect_rows: 1
reset-type:
  kind: sql
  words: event reset-type
  summary: Reset every event of one type
  database: app
  params: {event_type: {type: string, pattern: "[ -~]{1,100}"}}
  plan: {query: "SELECT id, status FROM billing_webhook_events WHERE event_type = {event_type}", require_rows: false}
  statement: "UPDATE billing_webhook_events SET status = 'pending' WHERE event_type = {event_type}"
  expect_rows: 1
bump:
  kind: sql
  words: counter bump
  summary: Add one to a counter
  database: app
  params: {name: {type: enum, values: [retries]}}
  statement: "UPDATE counters SET n = n + 1 WHERE name = {name}"
slow-retry:
  kind: sql
  words: event slow-retry
  summary: A statement that takes longer than its timeout
  database: app
  timeout: 1s
  params: {event_id: {type: uuid}}
  statement: "UPDATE billing_webhook_events SET status = 'pending' WHERE id = {event_id} AND pg_sleep(3) IS NOT NULL"
replay-event:
  kind: sql
  words: event replay
  summary: Reset a failed webhook event to pending and queue it again (webhook replay, as configuration)
  database: app
  params: {event_id: {type: uuid}}
  plan: {query: "SELECT id, event_type, status FROM billing_webhook_events WHERE id = {event_id} AND status IN ('failed', 'pending')"}
  statement: >-
    UPDATE billing_webhook_events SET status = 'pending', last_error = NULL
    WHERE id = {event_id} AND status IN ('failed', 'pending') RETURNING id, event_type
  enqueue:
    queue: billing-webhooks
    name: process
    data: {eventId: "{row.id}", eventType: "{row.event_type}"}
    job_id: "{row.id}"
    attempts: 3
    backoff: {type: exponential, delay: 5s}
"""


@pytest.fixture
def config(platform_db: str, redis_url: str, queue_prefix: str) -> Config:
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE counters (name text PRIMARY KEY, n int NOT NULL); INSERT INTO counters VALUES ('retries', 0)")
    return config_with_actions(platform_db, redis_url, queue_prefix, ACTIONS)


def status(platform_db: str, event_id: str) -> tuple[str, str | None]:
    with psycopg.connect(platform_db) as conn:
        r = conn.execute("SELECT status, last_error FROM billing_webhook_events WHERE id = %s", (event_id,)).fetchone()
    assert r is not None
    return r[0], r[1]


async def run(bot: Harness, text: str, approver: str = CAROL) -> tuple[str, str]:
    await bot.slash(ALICE, text)
    request = await bot.requested()
    await bot.click(approver, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale", "unknown")
    return done.state.value, done.error or str((done.result or {}).get("message"))


async def test_the_card_shows_the_rows_and_the_statement_runs_once_approved(bot: Harness, platform_db: str) -> None:
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert f"now: id={FAILED_EVENT}, status=failed, last_error=ECONNRESET talking to ledger" in card
    assert "expects exactly 1 row; anything else is rolled back" in card
    assert f"with event_id = '{FAILED_EVENT}'" in card
    assert status(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")  # nothing before approval
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert status(platform_db, FAILED_EVENT) == ("pending", None)
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "succeeded"]
    assert any("1 row changed in database `app`" in m.all_text() for m in bot.slack.thread(Harness.INCIDENT, done.card_ts or ""))


async def test_a_row_that_changes_after_the_card_makes_the_request_stale(bot: Harness, platform_db: str) -> None:
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    request = await bot.requested()
    with psycopg.connect(platform_db, autocommit=True) as conn:  # someone else fixes it meanwhile, with another error
        conn.execute("UPDATE billing_webhook_events SET last_error = 'timeout' WHERE id = %s", (FAILED_EVENT,))
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert "last_error was ECONNRESET talking to ledger, now timeout" in (done.error or "")
    assert status(platform_db, FAILED_EVENT) == ("failed", "timeout")


async def test_no_matching_row_is_refused_before_anyone_is_asked(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops event retry 00000000-0000-4000-8000-000000000000")
    reply = await bot.response(containing="nothing matches")
    assert "the plan query found no row" in reply["text"]
    assert await bot.last_request() is None


async def test_another_row_count_rolls_back_and_says_so(bot: Harness, platform_db: str) -> None:
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute("UPDATE billing_webhook_events SET event_type = 'invoice.paid'")  # three rows of that type now
    state, error = await run(bot, "/ops event reset-type invoice.paid")
    assert state == "failed"
    assert "touched 3 rows, expected exactly 1; it was rolled back, nothing changed" in error
    assert status(platform_db, PENDING_EVENT)[0] == "pending" and status(platform_db, FAILED_EVENT)[0] == "failed"


async def test_sql_in_a_value_is_a_value(bot: Harness, platform_db: str) -> None:
    hostile = "x'; DROP TABLE billing_webhook_events; --"
    state, error = await run(bot, f'/ops event reset-type "{hostile}"')
    assert state == "failed" and "touched 0 rows" in error  # it matched no event type: it was a value
    card = bot.slack.in_channel(Harness.INCIDENT)[0].all_text()
    assert "event_type = \"x'; DROP TABLE billing_webhook_events; --\"" in card
    with psycopg.connect(platform_db) as conn:
        count = conn.execute("SELECT count(*) FROM billing_webhook_events").fetchone()
    assert count == (3,)


@pytest.mark.parametrize(("text", "expected"), [
    ("/ops event retry ../../etc/passwd", "is not a UUID"),
    ("/ops event retry 8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a5１", "is not a UUID"),
    ("/ops event retry " + "8" * 200_000, "the command is 200,012 characters long"),
    ("/ops event retry 8f2c\x00", "invisible character (U+0000 NULL)"),
    ("/ops counter bump rеtries", "is not one of `retries`"),
    ("/ops event reset-type \"\u202eabc\"", "invisible character"),
])
async def test_hostile_values_are_refused_and_nothing_is_asked(bot: Harness, platform_db: str, text: str, expected: str) -> None:
    status_code, body = await bot.slash(ALICE, text)  # usage errors are answered in the ack, at once
    assert status_code == 200 and expected in body, body
    assert "`/ops" in body or "retype" in body or "Shorten" in body
    assert await bot.eventually(bot.audit_events, what="the attempt's audit row") == ["invalid"]
    assert await bot.last_request() is None
    assert status(platform_db, FAILED_EVENT)[0] == "failed"


async def test_two_approvers_clicking_at_once_run_it_once(bot: Harness, platform_db: str) -> None:
    await bot.slash(ALICE, "/ops counter bump retries")
    request = await bot.requested()
    await asyncio.gather(bot.click(CAROL, request.id), bot.click(DAN, request.id), bot.click(CAROL, request.id))
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    await asyncio.sleep(0.5)
    with psycopg.connect(platform_db) as conn:
        assert conn.execute("SELECT n FROM counters").fetchone() == (1,)
    assert (await bot.audit_events(request.id)).count("started") == 1


async def test_a_statement_over_its_timeout_is_cancelled_and_rolled_back(bot: Harness, platform_db: str) -> None:
    state, error = await run(bot, f"/ops event slow-retry {FAILED_EVENT}")
    assert state == "failed"
    assert "canceling statement due to statement timeout" in error
    assert status(platform_db, FAILED_EVENT)[0] == "failed"


# ---------------------------------------------------------------------------------------------- database down


class DownWorld:
    def __init__(self, bot: Harness, proxy: TcpProxy) -> None:
        self.bot, self.proxy = bot, proxy


@asynccontextmanager
async def proxied(behind: str, *, platform_db: str, redis_url: str, queue_prefix: str, slack: FakeSlack, state_db: str,
                  kubeconfig: str) -> AsyncIterator[DownWorld]:
    """The bot with the platform's database (``behind="db"``) or its Redis (``"redis"``) behind a proxy
    that can go down or freeze; opsbot's own database and Redis stay direct."""
    proxy, via = await TcpProxy.for_url(platform_db if behind == "db" else redis_url)
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE counters (name text PRIMARY KEY, n int NOT NULL); INSERT INTO counters VALUES ('retries', 0)")
    config = config_with_actions(via if behind == "db" else platform_db, via if behind == "redis" else redis_url, queue_prefix,
                                 ACTIONS)
    bot = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix)
    try:
        yield DownWorld(bot, proxy)
    finally:
        proxy.up()
        await asyncio.wait_for(bot.stop(), timeout=60)
        await proxy.stop()


@pytest_asyncio.fixture
async def through_proxy(platform_db: str, redis_url: str, queue_prefix: str, slack: FakeSlack, state_db: str,
                        kubeconfig: str) -> AsyncIterator[DownWorld]:
    async with proxied("db", platform_db=platform_db, redis_url=redis_url, queue_prefix=queue_prefix, slack=slack,
                       state_db=state_db, kubeconfig=kubeconfig) as world:
        yield world


async def test_platform_database_down_at_the_command_is_a_refusal_that_names_it(through_proxy: DownWorld) -> None:
    bot = through_proxy.bot
    through_proxy.proxy.down()
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    reply = await bot.response(containing="unavailable")
    assert "database `app`" in reply["text"]
    assert await bot.last_request() is None


async def test_platform_database_down_after_approval_fails_closed(through_proxy: DownWorld, platform_db: str) -> None:
    bot = through_proxy.bot
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    request = await bot.requested()
    through_proxy.proxy.down()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale", timeout=30)
    assert done.state.value == "failed"
    assert "could not re-check the target" in (done.error or "") and "database `app`" in (done.error or "")
    assert status(platform_db, FAILED_EVENT)[0] == "failed"


async def test_platform_database_frozen_at_the_plan_is_told_in_time(through_proxy: DownWorld) -> None:
    bot = through_proxy.bot
    through_proxy.proxy.pause()
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    reply = await bot.response(containing="database `app`", timeout=15)
    assert "no answer within" in reply["text"]
    assert await bot.last_request() is None


# ---------------------------------------------------------------------------------------------- replay, as a sql action


async def test_webhook_replay_as_a_sql_action_with_enqueue(bot: Harness, platform_db: str, redis_url: str,
                                                           queue_prefix: str) -> None:
    state, message = await run(bot, f"/ops event replay {FAILED_EVENT}")
    assert state == "succeeded", message
    assert f"queued job `{FAILED_EVENT}` on `billing-webhooks`" in message
    assert status(platform_db, FAILED_EVENT) == ("pending", None)
    card = bot.slack.in_channel(Harness.INCIDENT)[0].all_text()
    assert "then, before the commit, queue `billing-webhooks`: job `process`" in card and "3 attempts" in card
    queue = Queue("billing-webhooks", {"connection": redis_url, "prefix": queue_prefix})
    try:
        job = await queue.getJob(FAILED_EVENT)
        assert job is not None and job.name == "process"
        assert job.data == {"eventId": FAILED_EVENT, "eventType": "invoice.paid"}
        assert job.opts["attempts"] == 3 and job.opts["backoff"] == {"type": "exponential", "delay": 5000}
        # Replayed again while the job waits: the row is reset again, BullMQ keeps one job of that id.
        state, message = await run(bot, f"/ops event replay {FAILED_EVENT}")
        assert state == "succeeded", message
        counts = await queue.getJobCounts("waiting", "active", "delayed", "completed", "failed")
        assert sum(counts.values()) == 1
    finally:
        await queue.close()


async def test_replay_as_sql_with_redis_down_leaves_the_row_as_it_was(bot: Harness, config: Config, platform_db: str) -> None:
    await bot.slash(ALICE, f"/ops event replay {FAILED_EVENT}")
    request = await bot.requested()
    dead = config.queues["billing-webhooks"].model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    bot.runtime.pipeline.ctx.config.queues["billing-webhooks"] = dead  # type: ignore[index]
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "failed"
    assert "Redis for queue billing-webhooks is unavailable" in (done.error or "")
    assert status(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules" / "bullmq").exists(),
                    reason="needs node and `npm install` in tests/node (scripts/bootstrap does it)")
async def test_a_node_worker_takes_the_job_of_the_sql_replay(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    state, message = await run(bot, f"/ops event replay {FAILED_EVENT}")
    assert state == "succeeded", message
    proc = subprocess.run(["node", str(NODE_DIR / "worker.mjs"), redis_url, "billing-webhooks", queue_prefix, "1", "20000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[0]) == {
        "id": FAILED_EVENT, "name": "process", "data": {"eventId": FAILED_EVENT, "eventType": "invoice.paid"}, "attemptsMade": 0}


# ---------------------------------------------------------------------------------------------- the config changes


async def test_an_action_redefined_after_approval_was_asked_is_stale(bot: Harness, config: Config, platform_db: str) -> None:
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    request = await bot.requested()
    # Another replica started with a new config: same action name, another statement.
    changed = config.actions["retry-event"].model_copy(update={"statement": "DELETE FROM billing_webhook_events WHERE id = {event_id}"})
    object.__setattr__(bot.runtime.pipeline.ctx.config, "actions", {**config.actions, "retry-event": changed})
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert "the action's definition in opsbot's config changed since it was approved" in (done.error or "")
    assert status(platform_db, FAILED_EVENT)[0] == "failed"


async def test_an_action_removed_after_approval_was_asked_fails_and_says_why(bot: Harness, config: Config,
                                                                            platform_db: str) -> None:
    await bot.slash(ALICE, f"/ops event retry {FAILED_EVENT}")
    request = await bot.requested()
    object.__setattr__(bot.runtime.pipeline.ctx.config, "actions", {k: v for k, v in config.actions.items() if k != "retry-event"})
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "failed"
    assert "`retry-event` is no longer a command in opsbot's config" in (done.error or "")
    assert status(platform_db, FAILED_EVENT)[0] == "failed"


@pytest_asyncio.fixture
async def redis_proxied(platform_db: str, redis_url: str, queue_prefix: str, slack: FakeSlack, state_db: str,
                        kubeconfig: str) -> AsyncIterator[DownWorld]:
    async with proxied("redis", platform_db=platform_db, redis_url=redis_url, queue_prefix=queue_prefix, slack=slack,
                       state_db=state_db, kubeconfig=kubeconfig) as world:
        yield world


async def test_replay_as_sql_with_redis_frozen_is_unknown_and_says_the_row_was_rolled_back(redis_proxied: DownWorld,
                                                                                            platform_db: str) -> None:
    bot = redis_proxied.bot
    await bot.slash(ALICE, f"/ops event replay {FAILED_EVENT}")
    request = await bot.requested()
    redis_proxied.proxy.pause()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale", "unknown", timeout=30)
    assert done.state.value == "unknown", done.error
    assert "may or may not be queued" in (done.error or "") and "The statement was rolled back: no row was changed" in (done.error or "")
    assert status(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")
