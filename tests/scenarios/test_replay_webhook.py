"""Runbook: replay a failed billing webhook (seed 003), from chat, and a Node BullMQ worker takes it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
from bullmq import Queue

from bot.config import Config
from tests.conftest import ALICE, CAROL, FAILED_EVENT
from tests.harness import Harness

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def row(platform_db: str, event_id: str) -> tuple[str, str | None]:
    with psycopg.connect(platform_db) as conn:
        r = conn.execute("SELECT status, last_error FROM billing_webhook_events WHERE id = %s", (event_id,)).fetchone()
    assert r is not None
    return r[0], r[1]


async def replay(bot: Harness, event_id: str) -> str:
    await bot.slash(ALICE, f"/ops replay webhook {event_id}")
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    return done.state.value + (f": {done.error}" if done.error else "")


async def test_replay_resets_the_row_and_queues_exactly_one_job(bot: Harness, config: Config, platform_db: str,
                                                                 redis_url: str, queue_prefix: str) -> None:
    assert row(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")
    assert await replay(bot, FAILED_EVENT) == "succeeded"
    assert row(platform_db, FAILED_EVENT) == ("pending", None)
    card = bot.slack.in_channel(Harness.INCIDENT)[0].all_text()  # the job's data as JSON, not a Python dict
    assert f'job `process` with data `{{"eventId":"{FAILED_EVENT}","eventType":"invoice.paid"}}`' in card
    assert await bot.audit_events() == ["requested", "approval_given", "approved", "started", "succeeded"]

    queue = Queue("billing-webhooks", {"connection": redis_url, "prefix": queue_prefix})
    try:
        counts = await queue.getJobCounts("waiting", "active", "delayed", "completed", "failed")
        assert counts["waiting"] == 1 and sum(counts.values()) == 1
        job = await queue.getJob(FAILED_EVENT)
        assert job is not None and job.name == "process"
        assert job.data == {"eventId": FAILED_EVENT, "eventType": "invoice.paid"}

        # A second replay while the job is still waiting is refused and makes no second job.
        await bot.slash(ALICE, f"/ops replay webhook {FAILED_EVENT}")
        reply = await bot.response(containing="already queued")
        assert "job state: waiting" in reply["text"]
        counts = await queue.getJobCounts("waiting", "active", "delayed", "completed", "failed")
        assert sum(counts.values()) == 1
    finally:
        await queue.close()


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules" / "bullmq").exists(),
                    reason="needs node and `npm install` in tests/node (scripts/bootstrap does it)")
async def test_a_node_bullmq_worker_processes_the_replayed_job(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    assert await replay(bot, FAILED_EVENT) == "succeeded"
    proc = subprocess.run(["node", str(NODE_DIR / "worker.mjs"), redis_url, "billing-webhooks", queue_prefix, "1", "20000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout.strip().splitlines()[0])
    assert job == {"id": FAILED_EVENT, "name": "process", "data": {"eventId": FAILED_EVENT, "eventType": "invoice.paid"},
                   "attemptsMade": 0}
    queue = Queue("billing-webhooks", {"connection": redis_url, "prefix": queue_prefix})
    try:
        assert await queue.getJobState(FAILED_EVENT) == "completed"
    finally:
        await queue.close()


async def test_replaying_a_processed_event_is_refused(bot: Harness, platform_db: str) -> None:
    await bot.slash(ALICE, "/ops replay webhook 1d6e8f00-aaaa-4bbb-8ccc-000000000002")
    reply = await bot.response(containing="only failed, pending events can be replayed")
    assert "is `processed`" in reply["text"]
    assert await bot.last_request() is None


async def test_unknown_webhook_event(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops replay webhook 00000000-0000-0000-0000-000000000000")
    reply = await bot.response(containing="no webhook event")
    assert "billing_webhook_events" in reply["text"]


async def test_when_redis_refuses_the_job_the_row_is_left_as_it_was(bot: Harness, config: Config, platform_db: str) -> None:
    # Point the platform queue at a Redis that is not there: the transaction must roll back.
    dead = config.queues["billing-webhooks"].model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    bot.runtime.pipeline.ctx.config.queues["billing-webhooks"] = dead  # type: ignore[index]
    await bot.slash(ALICE, f"/ops replay webhook {FAILED_EVENT}")
    reply = await bot.response(containing="Refused")
    assert "Redis for queue billing-webhooks is unavailable" in reply["text"]
    assert row(platform_db, FAILED_EVENT) == ("failed", "ECONNRESET talking to ledger")
    assert await bot.last_request() is None
