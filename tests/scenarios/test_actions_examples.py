"""The examples' own actions (policies/examples/*.yaml `actions:`), as shipped, through signed Slack requests.

Nova's `webhook reset` (kind sql: plan query, exactly one row, a job added before the commit) and
`webhook requeue` (kind queue) run end to end against real PostgreSQL and Redis; for every example
the actions load, `opsbot policy check` is clean and `/ops help` lists them with their usage lines.
The http and flag kinds are built elsewhere (commands/actions/http.py, flag.py): here only their
configs are checked.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
from bullmq import Queue

from bot.config import Config, config_warnings, load_config
from bot.sandbox import world
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, CAROL, DAN, FAILED_EVENT, MALLORY, example_config
from tests.harness import Harness

EXAMPLES = Path(__file__).resolve().parents[2] / "policies" / "examples"
PENDING_EVENT = "2b7c9d11-bbbb-4ccc-9ddd-000000000003"  # the demo platform's pending invoice.created event
CLOSED_PORT = "127.0.0.1:9"  # discard: nothing listens, a connection is refused at once


def event(platform_db: str, event_id: str) -> tuple[str, str | None]:
    with psycopg.connect(platform_db) as conn:
        r = conn.execute("SELECT status, last_error FROM billing_webhook_events WHERE id = %s", (event_id,)).fetchone()
    assert r is not None
    return r[0], r[1]


@asynccontextmanager
async def queue_of(redis_url: str, queue_prefix: str) -> AsyncIterator[Queue]:
    queue = Queue("billing-webhooks", {"connection": redis_url, "prefix": queue_prefix})
    try:
        yield queue
    finally:
        await queue.close()


async def answer(bot: Harness, user: str, text: str, containing: str, *, channel: str = Harness.INCIDENT) -> str:
    """What the user is told for ``text``: the slash command's immediate answer (a usage error, a
    denial) or, when that is only an acknowledgement, the later answer containing ``containing``."""
    status, body = await bot.slash(user, text, channel=channel)
    assert status == 200
    if containing in body:
        return body
    return str((await bot.response(containing=containing))["text"])


async def jobs_in(queue: Queue) -> int:
    counts = await queue.getJobCounts("waiting", "active", "delayed", "completed", "failed", "paused", "prioritized")
    return sum(counts.values())


# ---------------------------------------------------------------------------------------------- kind sql: webhook reset


async def test_webhook_reset_shows_the_row_and_runs_the_statement_and_the_job(bot: Harness, platform_db: str, redis_url: str,
                                                                              queue_prefix: str) -> None:
    await bot.slash(ALICE, f"/ops webhook reset {FAILED_EVENT.upper()}")  # a UUID in capitals is the same UUID
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[0].all_text()
    assert f"now: id={FAILED_EVENT}, event_type=invoice.paid, status=failed, last_error=ECONNRESET talking to ledger" in card
    assert "expects exactly 1 row; anything else is rolled back" in card
    assert "then, before the commit, queue `billing-webhooks`: job `process`" in card
    assert event(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")  # asking changes nothing

    await bot.click(ALICE, request.id)  # her own request: she cannot approve it
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert event(platform_db, FAILED_EVENT) == ("pending", None)
    thread = " ".join(m.text for m in bot.slack.thread(Harness.INCIDENT, request.card_ts or ""))
    assert f"1 row changed in database `app`; queued job `{FAILED_EVENT}` on `billing-webhooks`" in thread
    assert await bot.audit_events(request.id) == ["requested", "vote_refused", "approval_given", "approved", "started",
                                                   "succeeded"]
    async with queue_of(redis_url, queue_prefix) as queue:
        assert await jobs_in(queue) == 1
        job = await queue.getJob(FAILED_EVENT)
        assert job is not None and job.name == "process" and job.data == {"eventId": FAILED_EVENT, "eventType": "invoice.paid"}
        assert job.opts["attempts"] == 3 and job.opts["backoff"] == {"type": "exponential", "delay": 5000}

    # Now pending: the plan query finds no failed row, so a second reset is refused and asks nobody.
    await bot.slash(ALICE, f"/ops webhook reset {FAILED_EVENT}")
    reply = await bot.response(containing="nothing matches")
    assert "the plan query found no row" in reply["text"]
    assert (await bot.last_request()) is not None and (await bot.last_request()).id == request.id  # type: ignore[union-attr]


async def test_webhook_reset_is_stale_when_the_row_changes_before_it_runs(bot: Harness, platform_db: str, redis_url: str,
                                                                          queue_prefix: str) -> None:
    await bot.slash(ALICE, f"/ops webhook reset {FAILED_EVENT}")
    request = await bot.requested()
    with psycopg.connect(platform_db, autocommit=True) as conn:  # the worker retried it meanwhile: another error
        conn.execute("UPDATE billing_webhook_events SET last_error = 'ETIMEDOUT' WHERE id = %s", (FAILED_EVENT,))
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert event(platform_db, FAILED_EVENT) == ("failed", "ETIMEDOUT")  # not run on a row nobody approved
    async with queue_of(redis_url, queue_prefix) as queue:
        assert await jobs_in(queue) == 0


async def test_two_approvals_at_once_reset_once_and_queue_one_job(bot: Harness, platform_db: str, redis_url: str,
                                                                  queue_prefix: str) -> None:
    await bot.slash(ALICE, f"/ops webhook reset {FAILED_EVENT}")
    request = await bot.requested()
    await asyncio.gather(bot.click(CAROL, request.id), bot.click(DAN, request.id))
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert (await bot.audit_events(request.id)).count("started") == 1
    assert event(platform_db, FAILED_EVENT) == ("pending", None)
    async with queue_of(redis_url, queue_prefix) as queue:
        assert await jobs_in(queue) == 1


@pytest.mark.parametrize(("value", "says"), [
    (f"{FAILED_EVENT}' OR '1'='1", "is not a UUID"),
    ("8f2c1b9e-5d4a-4с3b-9a1e-0f6d2c8b7a51", "is not a UUID"),  # a Cyrillic с
    ("８f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51", "is not a UUID"),  # a fullwidth 8
    ("../../etc/passwd", "is not a UUID"),
    ("8f2c1b9e%2F..", "is not a UUID"),
    # Refused at the door, before any command reads it (bot/untrusted.py): the whole command text.
    ("8f2c1b9e\x00-5d4a", "invisible character (U+0000 NULL)"),
    ("a" * 200_000, "characters long; opsbot reads at most 2,000"),
])
async def test_hostile_event_ids_are_refused_and_change_nothing(bot: Harness, platform_db: str, value: str, says: str) -> None:
    reply = await answer(bot, ALICE, f"/ops webhook reset {value}", says)
    assert says in reply, reply
    if "UUID" in says:  # the action's own refusal also says what to type
        assert "`event_id`" in reply and "/ops webhook reset <event_id>" in reply, reply
    assert len(reply) < 2000  # a 200 kB value is not echoed back
    assert await bot.last_request() is None
    assert event(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")


async def test_webhook_reset_refuses_when_the_platform_database_is_down(slack: FakeSlack, state_db: str, redis_url: str,
                                                                        kubeconfig: str, queue_prefix: str,
                                                                        platform_db: str) -> None:
    config = example_config(f"postgresql://nova@{CLOSED_PORT}/nova", redis_url, queue_prefix)
    bot = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix)
    try:
        await bot.slash(ALICE, f"/ops webhook reset {FAILED_EVENT}")
        reply = await bot.response(containing="database")
        assert "`app`" in reply["text"], reply["text"]
        assert await bot.last_request() is None  # nobody is asked to approve what could not be read
    finally:
        await asyncio.wait_for(bot.stop(), timeout=60)


# ---------------------------------------------------------------------------------------------- kind queue: webhook requeue


async def test_webhook_requeue_adds_the_runbooks_job_once(bot: Harness, platform_db: str, redis_url: str,
                                                          queue_prefix: str) -> None:
    await bot.slash(ALICE, f"/ops webhook requeue {PENDING_EVENT} invoice.created")
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[0].all_text()
    assert (f'queue `billing-webhooks`: job `process` with data `{{"eventId":"{PENDING_EVENT}","eventType":"invoice.created"}}`, '
            f"jobId `{PENDING_EVENT}`, 3 attempts") in card
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    async with queue_of(redis_url, queue_prefix) as queue:
        job = await queue.getJob(PENDING_EVENT)
        assert job is not None and job.data == {"eventId": PENDING_EVENT, "eventType": "invoice.created"}
        assert await jobs_in(queue) == 1
        # While that job waits, asking again is refused: the work is already queued.
        await bot.slash(ALICE, f"/ops webhook requeue {PENDING_EVENT} invoice.created")
        reply = await bot.response(containing="already in")
        assert f"job `{PENDING_EVENT}` is already in `billing-webhooks` (waiting)" in reply["text"]
        assert await jobs_in(queue) == 1
    assert event(platform_db, PENDING_EVENT) == ("pending", None)  # a queue action touches no row


@pytest.mark.parametrize(("event_type", "says"), [
    ("invoice.paid'; DROP TABLE billing_webhook_events; --", "is not text matching"),
    ("invoice.pаid", "CYRILLIC SMALL LETTER A: type it with plain ASCII letters"),
    ("invoice/../paid", "is not text matching"),
    ("x." + "a" * 70, "is 72 characters long"),
    ("invoice.paid\x07", "invisible character (U+0007 BELL)"),  # refused at the door
])
async def test_hostile_event_types_are_refused_and_queue_nothing(bot: Harness, redis_url: str, queue_prefix: str,
                                                                 event_type: str, says: str) -> None:
    reply = await answer(bot, ALICE, f'/ops webhook requeue {PENDING_EVENT} "{event_type}"', says)
    assert says in reply, reply
    if "BELL" not in says:
        assert "`event_type`" in reply and "/ops webhook requeue <event_id> <event_type>" in reply, reply
    assert await bot.last_request() is None
    async with queue_of(redis_url, queue_prefix) as queue:
        assert await jobs_in(queue) == 0


async def test_webhook_requeue_refuses_when_the_queues_redis_is_down(slack: FakeSlack, state_db: str, redis_url: str,
                                                                     kubeconfig: str, queue_prefix: str, platform_db: str) -> None:
    config = example_config(platform_db, f"redis://{CLOSED_PORT}/0", queue_prefix)
    bot = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix)
    try:
        await bot.slash(ALICE, f"/ops webhook requeue {PENDING_EVENT} invoice.created")
        reply = await bot.response(containing="Redis")
        assert "billing-webhooks" in reply["text"], reply["text"]
        assert await bot.last_request() is None
    finally:
        await asyncio.wait_for(bot.stop(), timeout=60)


async def test_someone_outside_the_rules_cannot_run_the_actions(bot: Harness, platform_db: str) -> None:
    reply = await answer(bot, MALLORY, f"/ops webhook reset {FAILED_EVENT}", "webhook-reset")
    assert "not allowed" in reply or "may not" in reply or "cannot" in reply, reply
    assert await bot.last_request() is None
    assert event(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")


# ---------------------------------------------------------------------------------------------- every example


USAGE = {  # the usage lines `/ops help` shows, per example
    "nova-rms": ["/ops maintenance <off|on>", "/ops outbox retry <id>", "/ops webhook reset <event_id>",
                 "/ops webhook requeue <event_id> <event_type>"],
    "nepxy": ["/ops payout retry <transaction_id>"],
    "nexnum": ["/ops provider override <provider> <off|on>"],
    "nearbybazaar": ["/ops feature <flag> <on|off>"],
}
ENGINEER = {"nova-rms": ALICE, "nepxy": "U0NPXENG1", "nexnum": "U0NEXENG1", "nearbybazaar": "U0NBONCALL1"}


def example_env(name: str, *, database: str, redis_url: str) -> dict[str, str]:
    """A value for every ${VAR} of the example, chosen by where it is used (as `opsbot dev` does)."""
    env = {}
    for var, path in world.env_refs((EXAMPLES / f"{name}.yaml").read_text()).items():
        kind = world.env_kind(path)
        env[var] = (database if kind == "database" else redis_url if kind == "redis" else
                    world.DEMO_TOKEN if kind == "token" else f"http://{CLOSED_PORT}")
    return env


@pytest.mark.parametrize("name", sorted(USAGE))
def test_each_example_loads_its_actions_and_policy_check_is_clean(name: str) -> None:
    env = example_env(name, database="postgresql://x@db/x", redis_url="redis://r:6379/0")
    config = load_config(EXAMPLES / f"{name}.yaml", env=env)
    assert config.actions and config_warnings(config) == []
    proc = subprocess.run([sys.executable, "-m", "bot", "policy", "check", "--config", str(EXAMPLES / f"{name}.yaml")],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stdout, proc.stdout
    assert world.DEMO_TOKEN not in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(USAGE))
async def test_help_lists_each_examples_actions_with_their_usage(name: str, slack: FakeSlack, state_db: str, redis_url: str,
                                                                  kubeconfig: str, queue_prefix: str, platform_db: str) -> None:
    config: Config = load_config(EXAMPLES / f"{name}.yaml", env=example_env(name, database=platform_db, redis_url=redis_url))
    channel = config.slack.allowed_channels[0] if config.slack.allowed_channels else Harness.INCIDENT
    slack.usergroups = {g: [ENGINEER[name]] for g in config.usergroups}
    bot = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix)
    try:
        await bot.slash(ENGINEER[name], "/ops help", channel=channel)
        text = (await bot.response(containing="opsbot commands"))["text"]
        for usage in USAGE[name]:
            assert usage in text, (usage, text)
        for action in config.actions.values():
            assert action.summary in text
        # And each action's own help names its parameters.
        first = next(iter(config.actions.values()))
        words = first.words or next(iter(config.actions)).replace("-", " ")
        await bot.slash(ENGINEER[name], f"/ops help {words}", channel=channel)
        assert USAGE[name][0] in (await bot.response(containing=USAGE[name][0]))["text"]
    finally:
        await asyncio.wait_for(bot.stop(), timeout=60)
