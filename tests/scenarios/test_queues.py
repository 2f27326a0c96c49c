"""Runbook: "Redis/queues delayed → look at the queue, look for retry storms" (seed 002), and the
billing webhook queue of seed 003, from chat instead of bull-board.

Jobs are failed the way they fail in production, by a BullMQ worker whose processor throws (the
Python bullmq Worker here, Node BullMQ's in the interoperability tests at the end); where a test
needs jobs that failed days ago, or in a known order, their finishing time is then moved back in
Redis, as if they had failed then.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from bullmq import Queue, Worker

from bot.config import Config
from bot.domain import OpsRequest
from tests.conftest import ALICE, CAROL, DAN, EVE, EXAMPLE, MALLORY
from tests.faults.proxy import TcpProxy
from tests.harness import Harness
from tests.scenarios.test_replay_webhook import NODE_DIR

QUEUE = "billing-webhooks"
DAY_MS = 86_400_000
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once
needs_node = pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules" / "bullmq").exists(),
                                reason="needs node and `npm install` in tests/node (scripts/bootstrap does it)")


# ---------------------------------------------------------------------------------------------- the platform's side


@asynccontextmanager
async def platform_queue(redis_url: str, prefix: str) -> AsyncIterator[Queue]:
    """The billing webhook queue as the platform's producer (and bull-board) sees it."""
    queue = Queue(QUEUE, {"connection": redis_url, "prefix": prefix})
    try:
        yield queue
    finally:
        await queue.close()


async def add(queue: Queue, job_id: str, *, attempts: int = 1, **opts: Any) -> None:
    await queue.add("process", {"eventId": job_id, "eventType": "invoice.paid"}, {"jobId": job_id, "attempts": attempts, **opts})


async def fail(queue: Queue, redis_url: str, prefix: str, ids: list[str], *, reason: str = "ECONNRESET talking to ledger",
               days_ago: float = 0) -> None:
    """Add a job per id and let a worker whose downstream is down fail each of them; then, oldest
    first in the order given, one second apart, ``days_ago`` back."""
    for job_id in ids:
        await add(queue, job_id)
    before = (await queue.getJobCounts("failed"))["failed"]

    async def processor(job: Any, token: str) -> None:
        raise RuntimeError(reason)

    worker = Worker(QUEUE, processor, {"connection": redis_url, "prefix": prefix})
    try:
        deadline = time.monotonic() + 20
        while (await queue.getJobCounts("failed"))["failed"] < before + len(ids):
            assert time.monotonic() < deadline, "the worker did not fail the jobs"
            await asyncio.sleep(0.05)
    finally:
        await worker.close(force=True)
    base = round(time.time() * 1000 - days_ago * DAY_MS) - len(ids) * 1000
    await set_finished(queue, {job_id: base + i * 1000 for i, job_id in enumerate(ids)}, "failed")


async def set_finished(queue: Queue, when: dict[str, int], state: str) -> None:
    """As if these jobs had finished at these times (ms): the job hash and the set's score."""
    for job_id, ms in when.items():
        await queue.client.hset(queue.toKey(job_id), "finishedOn", ms)
        await queue.client.zadd(queue.toKey(state), {job_id: ms})


async def complete(queue: Queue, redis_url: str, prefix: str, ids: list[str], *, days_ago: float) -> None:
    for job_id in ids:
        await add(queue, job_id, removeOnComplete=False)

    async def processor(job: Any, token: str) -> str:
        return "ok"

    worker = Worker(QUEUE, processor, {"connection": redis_url, "prefix": prefix})
    try:
        deadline = time.monotonic() + 20
        while (await queue.getJobCounts("completed"))["completed"] < len(ids):
            assert time.monotonic() < deadline, "the worker did not complete the jobs"
            await asyncio.sleep(0.05)
    finally:
        await worker.close(force=True)
    base = round(time.time() * 1000 - days_ago * DAY_MS)
    await set_finished(queue, {job_id: base + i for i, job_id in enumerate(ids)}, "completed")


async def states(queue: Queue, ids: list[str]) -> dict[str, str]:
    return {job_id: await queue.getJobState(job_id) for job_id in ids}


async def retried_from_failed(queue: Queue, job_id: str) -> int:
    """How many times the job was moved from failed back to waiting (BullMQ's event stream)."""
    events = await queue.client.xrange(queue.toKey("events"), "-", "+")
    return sum(1 for _, e in events if e.get("event") == "waiting" and e.get("jobId") == job_id and e.get("prev") == "failed")


# ---------------------------------------------------------------------------------------------- the chat side


async def request(bot: Harness, text: str, user: str = ALICE) -> OpsRequest:
    """The request (with its card posted) that this command opens; not an earlier one."""
    earlier = await bot.last_request()
    status, body = await bot.slash(user, text)
    assert status == 200, body

    async def opened() -> OpsRequest | None:
        r = await bot.last_request()
        return r if r is not None and r.card_ts and (earlier is None or r.id != earlier.id) else None

    return await bot.eventually(opened, what=f"a request for {text!r}")


async def approved(bot: Harness, req: OpsRequest, approver: str = CAROL) -> OpsRequest:
    await bot.click(approver, req.id, "approve")
    return await bot.state_of(req.id, "succeeded", "failed", "stale", "unknown")


def card_text(bot: Harness, req: OpsRequest) -> str:
    return next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == req.card_ts).all_text()


def thread_text(bot: Harness, req: OpsRequest) -> str:
    return "\n".join(m.text for m in bot.slack.thread(Harness.INCIDENT, req.card_ts or ""))


FULL_STORY = ["requested", "approval_given", "approved", "started", "succeeded"]


# ---------------------------------------------------------------------------------------------- queue stats / failed


async def test_stats_shows_counts_paused_and_the_oldest_waiting_job(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ["f-1", "f-2", "f-3"])
        two_hours_ago = round(time.time() * 1000) - 2 * 3600 * 1000
        await add(q, "w-old", timestamp=two_hours_ago)
        await add(q, "w-new")
        await add(q, "d-1", delay=3_600_000)

        started = time.monotonic()
        await bot.slash(EVE, f"/ops queue stats {QUEUE}")  # an auditor may look
        reply = await bot.response(containing=f"{QUEUE}: running")
        assert time.monotonic() - started < 2.5, "a look answers within the read deadline"
        text = reply["text"]
        assert reply["response_type"] == "in_channel"
        assert f"*{QUEUE}: running, 2 waiting, 0 active, 3 failed*" in text
        assert "waiting 2 · active 0 · delayed 1 · failed 3 · completed 0 · paused 0" in text
        assert "not paused" in text
        assert "oldest waiting job: `w-old` (process), added 2h ago" in text
        assert await bot.audit_events() == ["read"]

        await q.pause()  # paused from bull-board: the answer says so and how to resume
        await bot.slash(EVE, f"/ops queue stats {QUEUE}")
        reply = await bot.response(containing=f"{QUEUE}: paused")
        assert f"workers take no new job until `/ops queue resume {QUEUE}` (2 waiting)" in reply["text"]


async def test_failed_lists_the_latest_failures_scrubbed_and_bounded(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ["old-1", "old-2"])
        await fail(q, redis_url, queue_prefix, ["leaky"], reason="ledger said 401 for password=hunter2 <!channel> `rm -rf`")
        await fail(q, redis_url, queue_prefix, ["long"], reason="x" * 5000 + "\x00\x1b[31m")

        await bot.slash(ALICE, f"/ops queue failed {QUEUE} --limit 3")
        reply = await bot.response(containing="failed job")
        text = reply["text"]
        assert f"*{QUEUE}: 4 failed jobs, the latest 3 shown*" in text
        lines = [line for line in text.splitlines() if line.startswith("• `")]
        assert [line.split("`")[1] for line in lines] == ["long", "leaky", "old-2"], "newest first"
        assert "1 attempt, failed" in lines[0]
        assert "hunter2" not in text and "password=[redacted]" in text, "secrets scrubbed"
        assert "<!channel>" not in text and "&lt;!channel&gt;" in text, "no mention smuggled in through a reason"
        assert "`rm -rf`" not in text
        assert "x" * 200 + "…" in lines[0] and "x" * 201 not in text, "a reason is cut at 200 characters"
        assert "1 older failed job not shown; `--limit 50` shows more" in text
        assert f"`/ops queue retry {QUEUE} <job-id>`" in text
        rows = await bot.runtime.audit.log.rows()
        assert [r["event"] for r in rows] == ["read"] and "hunter2" not in json.dumps(rows, default=str)


@pytest.mark.parametrize(("limit", "message"), [
    ("100000", "`--limit` takes 1 to 50, got 100,000. Try `--limit 50`."),
    ("0", "`--limit` takes 1 to 50, got 0. Try `--limit 1`."),
    ("-3", "`--limit` must be a whole number written with the digits 0-9, got `-3`."),
    ("５", "`--limit` must be written with the digits 0-9; `５` uses U+FF15 FULLWIDTH DIGIT FIVE. Type `5`."),
    ("99999999999", "`--limit` `99999999999` is too large."),
])
async def test_failed_limit_out_of_range_is_refused(bot: Harness, limit: str, message: str) -> None:
    status, body = await bot.slash(ALICE, f"/ops queue failed {QUEUE} --limit {limit}")
    assert status == 200 and message in body
    assert await bot.eventually(bot.audit_events, what="the audit row") == ["invalid"]


# ---------------------------------------------------------------------------------------------- queue retry


async def test_engineer_retries_one_failed_job_after_approval(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ["evt-41", "evt-42"])
        req = await request(bot, f'/ops queue retry {QUEUE} evt-42 --reason "INC-77 ledger back"')
        card = card_text(bot, req)
        assert f"{QUEUE}: retry failed job evt-42 (process)" in card
        assert "1 attempt, failed" in card and "ECONNRESET talking to ledger" in card
        assert "attempts made so far are kept" in card
        assert req.plan["target_name"] == QUEUE and req.plan["target_kind"] == "queues"
        assert await q.getJobState("evt-42") == "failed", "nothing happens before approval"

        done = await approved(bot, req)
        assert done.state.value == "succeeded", done.error
        assert await states(q, ["evt-41", "evt-42"]) == {"evt-41": "failed", "evt-42": "waiting"}
        job = await q.getJob("evt-42")
        assert job is not None and job.attemptsMade == 1 and not job.failedReason
        assert "job `evt-42` on `billing-webhooks` moved from failed to waiting (state now: waiting)" in thread_text(bot, done)
        assert await bot.audit_events(req.id) == FULL_STORY


async def test_retrying_a_job_that_is_not_failed_is_nothing_to_do(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await add(q, "evt-1")
        await bot.slash(ALICE, f"/ops queue retry {QUEUE} evt-1")
        reply = await bot.response(containing="nothing to do")
        assert "job `evt-1` in `billing-webhooks` is waiting, not failed; nothing to do." in reply["text"]
        assert await bot.last_request() is None


@pytest.mark.parametrize(("job_id", "in_ack", "message"), [
    ("evt-1\x00", True, "invisible character (U+0000 NULL)"),
    ("evt-1\x1b[2J", True, "invisible character (U+001B ESCAPE)"),
    ("evt\u202e1", True, "invisible character (U+202E RIGHT-TO-LEFT OVERRIDE)"),
    ("e" * 200_000, True, "the command is 200,029 characters long; opsbot reads at most 2,000"),
    ("e" * 201, True, "that does not look like a job id (at most 200 printable characters)"),
    ("еvt-1", False, "no job `еvt-1` in queue `billing-webhooks` (`еvt-1` contains U+0435 CYRILLIC SMALL LETTER IE"),
    ("evt-404", False, "no job `evt-404` in queue `billing-webhooks`. `/ops queue failed billing-webhooks` lists the failed ones."),
    ("meta", False, "no job `meta` in queue"),  # the queue's own keys are not jobs
    ("1:logs", False, "no job `1:logs` in queue"),
    ("../../wait", False, "no job `../../wait` in queue"),
])
async def test_hostile_or_forged_job_ids_change_nothing(bot: Harness, redis_url: str, queue_prefix: str, job_id: str,
                                                       in_ack: bool, message: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ["evt-1"])
        await q.pause()  # gives the queue a meta hash for `meta` to find
        status, body = await bot.slash(ALICE, f"/ops queue retry {QUEUE} {job_id}")
        assert status == 200
        if in_ack:
            assert message in body
        else:
            reply = await bot.response(containing="no job")
            assert message in reply["text"]
        assert await bot.eventually(bot.audit_events, what="the audit row") == ["invalid"]
        assert await bot.last_request() is None
        assert await q.getJobState("evt-1") == "failed"
        assert (await q.getJobCounts("failed", "waiting"))["waiting"] == 0


# ---------------------------------------------------------------------------------------------- queue retry-failed


async def test_retry_failed_retries_exactly_the_oldest_ids_on_the_card(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    ids = [f"evt-{i:02d}" for i in range(14)]
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ids)  # evt-00 failed first
        req = await request(bot, f"/ops queue retry-failed {QUEUE} --limit 12")
        card = card_text(bot, req)
        assert f"{QUEUE}: retry 12 of 14 failed jobs" in card
        assert "oldest first: " + ", ".join(f"`{i}`" for i in ids[:10]) + " and 2 more" in card
        assert "2 newer failed jobs stay failed" in card
        assert req.plan["before"] == {"failed_job_ids": ids[:12]}
        assert set((await states(q, ids)).values()) == {"failed"}

        done = await approved(bot, req)
        assert done.state.value == "succeeded", done.error
        after = await states(q, ids)
        assert [i for i in ids if after[i] == "waiting"] == ids[:12]
        assert [i for i in ids if after[i] == "failed"] == ids[12:]
        assert done.result is not None and done.result["retried"] == ids[:12] and done.result["skipped"] == {}
        assert "retried 12 of 12 failed jobs on `billing-webhooks`" in thread_text(bot, done)
        assert await bot.audit_events(req.id) == FULL_STORY


async def test_retry_failed_defaults_to_ten_and_is_bounded(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, [f"evt-{i:02d}" for i in range(11)])
        req = await request(bot, f"/ops queue retry-failed {QUEUE}")
        assert f"{QUEUE}: retry 10 of 11 failed jobs" in card_text(bot, req)
    _, body = await bot.slash(ALICE, f"/ops queue retry-failed {QUEUE} --limit 100000")
    assert "`--limit` takes 1 to 100, got 100,000. Try `--limit 100`." in body


async def test_retry_failed_with_no_failed_jobs_is_nothing_to_do(bot: Harness) -> None:
    await bot.slash(ALICE, f"/ops queue retry-failed {QUEUE}")
    reply = await bot.response(containing="nothing to do")
    assert f"queue `{QUEUE}` has no failed jobs; nothing to do." in reply["text"]
    assert await bot.last_request() is None


async def test_retry_failed_is_stale_when_one_of_its_jobs_was_retried_by_hand(bot: Harness, redis_url: str,
                                                                             queue_prefix: str) -> None:
    ids = ["evt-1", "evt-2", "evt-3"]
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ids)
        req = await request(bot, f"/ops queue retry-failed {QUEUE}")
        job = await q.getJob("evt-2")  # meanwhile someone clicks Retry in bull-board
        assert job is not None
        await job.retry()

        done = await approved(bot, req)
        assert done.state.value == "stale"
        assert "queue billing-webhooks changed after approval (failed_job_ids: no longer there: evt-2)." in (done.error or "")
        assert await states(q, ids) == {"evt-1": "failed", "evt-2": "waiting", "evt-3": "failed"}, "nothing retried"
        assert await retried_from_failed(q, "evt-2") == 1
        assert "Not run" in thread_text(bot, done)
        assert await bot.audit_events(req.id) == ["requested", "approval_given", "approved", "started", "stale"]


async def test_two_fast_approvals_retry_the_jobs_once(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    ids = ["evt-1", "evt-2", "evt-3"]
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ids)
        req = await request(bot, f"/ops queue retry-failed {QUEUE}")
        await asyncio.gather(bot.click(CAROL, req.id, "approve"), bot.click(DAN, req.id, "approve"))
        done = await bot.state_of(req.id, "succeeded", "failed", "stale", "unknown")
        assert done.state.value == "succeeded", done.error
        await asyncio.sleep(1)  # a second execution, if there were one, would have run by now
        assert [await retried_from_failed(q, i) for i in ids] == [1, 1, 1]
        events = await bot.audit_events(req.id)
        assert events.count("started") == 1 and events.count("succeeded") == 1 and events.count("approved") == 1


# ---------------------------------------------------------------------------------------------- queue pause / resume


async def test_pause_and_resume_through_approval(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await add(q, "evt-1")
        req = await request(bot, f"/ops queue pause {QUEUE}")
        card = card_text(bot, req)
        assert f"{QUEUE}: pause (workers take no new job)" in card
        assert f"0 active jobs run to the end; 1 waiting job and 0 delayed jobs wait until `/ops queue resume {QUEUE}`" in card
        assert not await q.isPaused()
        done = await approved(bot, req)
        assert done.state.value == "succeeded", done.error
        assert await q.isPaused()
        assert "queue `billing-webhooks` paused: workers take no new job." in thread_text(bot, done)
        assert await bot.audit_events(req.id) == FULL_STORY

        await bot.slash(ALICE, f"/ops queue pause {QUEUE}")
        reply = await bot.response(containing="nothing to do")
        assert f"queue `{QUEUE}` is already paused; nothing to do." in reply["text"]

        req = await request(bot, f"/ops queue resume {QUEUE}")
        assert f"{QUEUE}: resume (workers take jobs again)" in card_text(bot, req)
        done = await approved(bot, req)
        assert done.state.value == "succeeded", done.error
        assert not await q.isPaused()
        assert await q.getJobState("evt-1") == "waiting"

        await bot.slash(ALICE, f"/ops queue resume {QUEUE}")
        reply = await bot.response(containing="nothing to do")
        assert f"queue `{QUEUE}` is already running (not paused); nothing to do." in reply["text"]


async def test_pause_is_stale_when_someone_paused_it_meanwhile(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        req = await request(bot, f"/ops queue pause {QUEUE}")
        await q.pause()
        done = await approved(bot, req)
        assert done.state.value == "stale"
        assert "already paused" in (done.error or "")


# ---------------------------------------------------------------------------------------------- queue clean


async def test_clean_removes_only_finished_jobs_older_than_the_age(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        old = [f"old-{i}" for i in range(5)]
        await fail(q, redis_url, queue_prefix, old, days_ago=10)
        await fail(q, redis_url, queue_prefix, ["recent-1", "recent-2", "recent-3"], days_ago=1)
        await complete(q, redis_url, queue_prefix, ["done-1", "done-2"], days_ago=10)

        req = await request(bot, f"/ops queue clean {QUEUE} --failed --older-than 7d --limit 4")
        card = card_text(bot, req)
        assert f"{QUEUE}: remove 4 failed jobs older than 7d" in card
        assert "5 failed jobs finished before" in card and "the oldest 4 are removed (`--limit`), the rest stay" in card
        assert "4 of the queue's 8 failed jobs remain" in card
        assert (await q.getJobCounts("failed"))["failed"] == 8, "nothing happens before approval"

        done = await approved(bot, req)
        assert done.state.value == "succeeded", done.error
        assert done.result is not None and done.result["removed"] == 4
        after = await states(q, [*old, "recent-1", "done-1", "done-2"])
        assert [i for i in old if after[i] == "unknown"] == old[:4], "the oldest first"
        assert after["old-4"] == after["recent-1"] == "failed" and after["done-1"] == after["done-2"] == "completed"
        assert await q.getJob("old-0") is None, "the job itself is gone, not only its place in the set"
        assert "removed 4 failed jobs of `billing-webhooks` that finished before" in thread_text(bot, done)
        assert await bot.audit_events(req.id) == FULL_STORY

        req = await request(bot, f"/ops queue clean {QUEUE} --completed --older-than 7d")
        assert f"{QUEUE}: remove 2 completed jobs older than 7d" in card_text(bot, req)
        done = await approved(bot, req)
        assert done.state.value == "succeeded", done.error
        assert (await q.getJobCounts("completed"))["completed"] == 0


async def test_clean_removes_no_job_that_aged_past_the_cutoff_while_waiting_for_approval(
        bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ["old-1", "old-2"], days_ago=8)
        await fail(q, redis_url, queue_prefix, ["almost"])
        await set_finished(q, {"almost": round(time.time() * 1000) - 7 * DAY_MS + 1500}, "failed")  # 7d old in 1.5 s
        req = await request(bot, f"/ops queue clean {QUEUE} --failed --older-than 7d")
        assert f"{QUEUE}: remove 2 failed jobs older than 7d" in card_text(bot, req)
        await asyncio.sleep(2)  # the approver takes their time; `almost` is now older than 7d
        done = await approved(bot, req)
        assert done.state.value == "succeeded", done.error
        assert await states(q, ["old-1", "old-2", "almost"]) == {"old-1": "unknown", "old-2": "unknown", "almost": "failed"}


async def test_clean_with_nothing_old_enough_is_nothing_to_do(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ["recent"], days_ago=1)
        await bot.slash(ALICE, f"/ops queue clean {QUEUE} --failed --older-than 7d")
        reply = await bot.response(containing="nothing to do")
        assert f"queue `{QUEUE}` has no failed job that finished before" in reply["text"] and "(older than 7d)" in reply["text"]
        assert await bot.last_request() is None


@pytest.mark.parametrize(("args", "message"), [
    ("--failed --older-than 99y", "`--older-than` takes a duration such as 12h, 7d or 30d, got `99y`."),
    ("--failed --older-than 999999d", "`--older-than` takes 1m to 365d, got `999999d`."),
    ("--failed --older-than 0s", "`--older-than` takes 1m to 365d, got `0s`."),
    ("--failed --older-than 7d --limit 100000", "`--limit` takes 1 to 10,000, got 100,000. Try `--limit 10000`."),
    ("--failed --completed --older-than 7d", "give `--failed` or `--completed`, not both"),
    ("--older-than 7d", "say which finished jobs to remove: `--failed` or `--completed`"),
    ("--failed", "`--older-than` is needed, e.g. `--older-than 7d`"),
    ("--failed --older-than", "`--older-than` needs a value"),
    ("--waiting --older-than 7d", "unknown option `--waiting` for `queue clean`"),
])
async def test_clean_refuses_bad_options(bot: Harness, args: str, message: str) -> None:
    status, body = await bot.slash(ALICE, f"/ops queue clean {QUEUE} {args}")
    assert status == 200 and message in body, body
    assert await bot.eventually(bot.audit_events, what="the audit row") == ["invalid"]


# ---------------------------------------------------------------------------------------------- every queue command


ALL = [f"queue stats {QUEUE}", f"queue failed {QUEUE}", f"queue retry {QUEUE} evt-1", f"queue retry-failed {QUEUE}",
       f"queue pause {QUEUE}", f"queue resume {QUEUE}", f"queue clean {QUEUE} --failed --older-than 7d"]


@pytest.mark.parametrize("text", ALL, ids=lambda t: t.split()[1])
async def test_a_queue_the_config_does_not_list_is_refused(bot: Harness, text: str) -> None:
    for name, hint in (("payments", ""), ("bіlling-webhooks", "U+0456 CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I")):
        status, body = await bot.slash(ALICE, "/ops " + text.replace(QUEUE, name))
        assert status == 200
        assert f"unknown queue `{name}`" in body and "Known queues: billing-webhooks." in body and hint in body
    async def both_recorded() -> list[str] | None:
        events = await bot.audit_events()
        return events if len(events) == 2 else None

    assert await bot.eventually(both_recorded, what="the audit rows") == ["invalid", "invalid"]


@pytest.mark.parametrize("text", ALL, ids=lambda t: t.split()[1])
async def test_redis_down_is_a_clear_refusal_and_nothing_is_created(bot: Harness, config: Config, text: str) -> None:
    dead = config.queues[QUEUE].model_copy(update={"redis_url": DEAD_REDIS})
    bot.runtime.pipeline.ctx.config.queues[QUEUE] = dead  # type: ignore[index]
    started = time.monotonic()
    await bot.slash(ALICE, "/ops " + text)
    reply = await bot.response(containing="Refused")
    assert time.monotonic() - started < 5
    assert "Redis for queue billing-webhooks is unavailable" in reply["text"] and "Nothing was changed" in reply["text"]
    assert await bot.last_request() is None
    assert await bot.audit_events() == ["refused"]


async def test_redis_down_between_approval_and_execution_fails_and_retries_nothing(
        bot: Harness, config: Config, redis_url: str, queue_prefix: str) -> None:
    ids = ["evt-1", "evt-2"]
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ids)
        req = await request(bot, f"/ops queue retry-failed {QUEUE}")
        live = config.queues[QUEUE]
        bot.runtime.pipeline.ctx.config.queues[QUEUE] = live.model_copy(update={"redis_url": DEAD_REDIS})  # type: ignore[index]
        done = await approved(bot, req)
        assert done.state.value == "failed"
        assert "could not re-check the target: Redis for queue billing-webhooks is unavailable" in (done.error or "")
        assert await states(q, ids) == {"evt-1": "failed", "evt-2": "failed"}
        assert [await retried_from_failed(q, i) for i in ids] == [0, 0]


async def test_redis_lost_in_the_middle_of_a_batch_says_exactly_what_was_retried(
        bot: Harness, config: Config, redis_url: str, queue_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = ["evt-1", "evt-2", "evt-3"]
    proxy, proxied_url = await TcpProxy.for_url(redis_url)
    try:
        bot.runtime.pipeline.ctx.config.queues[QUEUE] = config.queues[QUEUE].model_copy(  # type: ignore[index]
            update={"redis_url": proxied_url})
        adapter = bot.runtime.queues
        retry_job = adapter.retry_job

        async def then_redis_goes(queue: Any, job_id: str) -> str:  # the first job is retried, then Redis is gone
            result = await retry_job(queue, job_id)
            proxy.down()
            return result

        monkeypatch.setattr(adapter, "retry_job", then_redis_goes)
        async with platform_queue(redis_url, queue_prefix) as q:
            await fail(q, redis_url, queue_prefix, ids)
            done = await approved(bot, await request(bot, f"/ops queue retry-failed {QUEUE}"))
            assert done.state.value == "unknown"
            assert ("Retried: `evt-1`; `evt-2`: unknown (Redis failed during the call); not tried: `evt-3`. "
                    f"Check `/ops queue failed {QUEUE}` before retrying again.") in (done.error or "")
            assert "It was not retried: check the target's state by hand" in thread_text(bot, done)
            assert await states(q, ids) == {"evt-1": "waiting", "evt-2": "failed", "evt-3": "failed"}
    finally:
        await proxy.stop()


async def test_who_may_do_what_on_a_queue(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await fail(q, redis_url, queue_prefix, ["evt-1"])
    await bot.slash(EVE, f"/ops queue retry {QUEUE} evt-1")  # an auditor looks, never changes
    reply = await bot.response(containing="Not allowed")
    assert "you may not run `queue-retry` (your roles: auditor; allowed: engineer)" in reply["text"]
    await bot.slash(MALLORY, f"/ops queue failed {QUEUE}")
    reply = await bot.response(containing="Not allowed")
    assert "you may not run `queue-failed`" in reply["text"]
    await bot.slash(ALICE, f"/ops queue retry {QUEUE} evt-1 --dry-run")
    reply = await bot.response(containing="Dry run")
    assert f"*{QUEUE}: retry failed job evt-1 (process)*" in reply["text"] and "approval" in reply["text"]
    for text in ("/ops queue", "/ops queue frobnicate", "/ops queue retryfailed x"):
        assert "`queue` what? Did you mean: `/ops queue stats <queue>`" in (await bot.slash(ALICE, text))[1]
    await bot.slash(ALICE, "/ops help queue retry-failed")
    reply = await bot.response(containing="retry-failed")
    assert "You may run it; needs 1 approval from approver." in reply["text"]


def test_policy_explain_without_reading_the_queue() -> None:
    proc = subprocess.run([sys.executable, "-m", "bot", "policy", "explain", "--config", str(EXAMPLE), "--as", "U0ALICE",
                           "--no-plan", f"queue clean {QUEUE} --failed --older-than 7d"],
                          capture_output=True, text=True, env={**os.environ}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"not read (--no-plan): queue {QUEUE} [production]" in proc.stdout
    assert "rule:     queue-changes" in proc.stdout and "→ needs approval" in proc.stdout


# ---------------------------------------------------------------------------------------------- Node BullMQ workers


def node_worker(redis_url: str, prefix: str, *args: str) -> list[str]:
    return ["node", str(NODE_DIR / "worker.mjs"), redis_url, QUEUE, prefix, *args]


@needs_node
async def test_a_job_a_node_worker_failed_is_retried_from_chat_and_then_processed_by_it(
        bot: Harness, redis_url: str, queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        await add(q, "evt-node")
        proc = subprocess.run(node_worker(redis_url, queue_prefix, "1", "20000", "fail"), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert await q.getJobState("evt-node") == "failed"

        await bot.slash(ALICE, f"/ops queue failed {QUEUE}")
        reply = await bot.response(containing="failed job")
        assert "`evt-node` process — 1 attempt, failed" in reply["text"] and "ECONNRESET talking to ledger" in reply["text"]

        done = await approved(bot, await request(bot, f"/ops queue retry {QUEUE} evt-node"))
        assert done.state.value == "succeeded", done.error

        proc = subprocess.run(node_worker(redis_url, queue_prefix, "1", "20000"), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        job = json.loads(proc.stdout.strip().splitlines()[0])
        assert job == {"id": "evt-node", "name": "process", "data": {"eventId": "evt-node", "eventType": "invoice.paid"},
                       "attemptsMade": 1}
        assert await q.getJobState("evt-node") == "completed"


@needs_node
async def test_a_paused_queue_is_not_consumed_by_a_node_worker_until_resumed(bot: Harness, redis_url: str,
                                                                            queue_prefix: str) -> None:
    async with platform_queue(redis_url, queue_prefix) as q:
        done = await approved(bot, await request(bot, f"/ops queue pause {QUEUE}"))
        assert done.state.value == "succeeded", done.error
        await add(q, "evt-paused")  # the platform keeps producing while the queue is paused

        worker = await asyncio.create_subprocess_exec(*node_worker(redis_url, queue_prefix, "1", "30000"),
                                                      stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert worker.stderr is not None and worker.stdout is not None
            assert (await asyncio.wait_for(worker.stderr.readline(), 15)).decode().strip() == "ready"
            with pytest.raises(TimeoutError):  # the worker is up and takes nothing
                await asyncio.wait_for(worker.stdout.readline(), 2.5)
            assert await q.getJobState("evt-paused") == "waiting"

            await bot.slash(ALICE, f"/ops queue stats {QUEUE}")
            assert "1 waiting" in (await bot.response(containing=f"{QUEUE}: paused"))["text"]

            done = await approved(bot, await request(bot, f"/ops queue resume {QUEUE}"))
            assert done.state.value == "succeeded", done.error
            line = await asyncio.wait_for(worker.stdout.readline(), 15)
            assert json.loads(line)["id"] == "evt-paused"
            assert await asyncio.wait_for(worker.wait(), 15) == 0
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        assert await q.getJobState("evt-paused") == "completed"
