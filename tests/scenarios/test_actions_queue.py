"""`kind: queue` actions end to end: one BullMQ job, as Node BullMQ adds it (a Node worker takes it),
one job per id even when approvers click at once, an id that is still queued is refused, a finished
one is replaced, and Redis down means nothing is added."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from bullmq import Queue

from bot.config import Config
from bot.sandbox.slack_api import FakeSlack
from tests.actions_support import config_with_actions
from tests.conftest import ALICE, CAROL, DAN
from tests.faults.proxy import TcpProxy
from tests.harness import Harness

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
ACTIONS = """
resend-invoice:
  kind: queue
  words: invoice resend
  summary: Queue the invoice e-mail again
  params:
    invoice: {type: int, min: 1, max: 99999999}
    channel: {type: enum, values: [email, sms], default: email}
  job:
    queue: billing-webhooks
    name: invoice.resend
    data: {invoiceId: "{invoice}", via: "{channel}", requestedBy: "{requester}", note: "{reason}"}
    job_id: "invoice-{invoice}"
    attempts: 4
    backoff: {type: fixed, delay: 30s}
nudge:
  kind: queue
  words: billing nudge
  summary: Queue one nudge job (a new job per request)
  job: {queue: billing-webhooks, name: nudge, data: {by: "{requester}", request: "{request_id}"}}
"""


@pytest.fixture
def config(platform_db: str, redis_url: str, queue_prefix: str) -> Config:
    return config_with_actions(platform_db, redis_url, queue_prefix, ACTIONS)


@pytest.fixture
async def queue(redis_url: str, queue_prefix: str) -> AsyncIterator[Queue]:
    q = Queue("billing-webhooks", {"connection": redis_url, "prefix": queue_prefix})
    yield q
    await q.close()


async def run(bot: Harness, text: str) -> tuple[str, str, str]:
    await bot.slash(ALICE, text)
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale", "unknown")
    return request.id, done.state.value, done.error or str((done.result or {}).get("message"))


async def test_the_job_is_added_as_configured(bot: Harness, queue: Queue) -> None:
    request_id, state, message = await run(bot, '/ops invoice resend 4711 sms --reason "INC-7 customer asked"')
    assert state == "succeeded", message
    assert "job `invoice-4711` added to `billing-webhooks` (state: waiting)" in message
    card = bot.slack.in_channel(Harness.INCIDENT)[0].all_text()
    assert "job `invoice.resend` with data" in card and "4 attempts" in card and "jobId `invoice-4711`" in card
    job = await queue.getJob("invoice-4711")
    assert job is not None and job.name == "invoice.resend"
    assert job.data == {"invoiceId": 4711, "via": "sms", "requestedBy": ALICE, "note": "INC-7 customer asked"}
    assert job.opts["attempts"] == 4 and job.opts["backoff"] == {"type": "fixed", "delay": 30000}
    assert await bot.audit_events(request_id) == ["requested", "approval_given", "approved", "started", "succeeded"]


async def finish_all(queue: Queue, redis_url: str, prefix: str) -> None:
    """The platform's worker takes the one waiting job and completes it (a Node BullMQ worker that
    exits after one job, so nothing is left consuming when the test adds the next one)."""
    proc = subprocess.run(["node", str(NODE_DIR / "worker.mjs"), redis_url, "billing-webhooks", prefix, "1", "20000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules" / "bullmq").exists(),
                    reason="needs node and `npm install` in tests/node (scripts/bootstrap does it)")
async def test_a_job_still_queued_is_refused_and_a_finished_one_replaced(bot: Harness, queue: Queue, redis_url: str,
                                                                         queue_prefix: str) -> None:
    _, state, message = await run(bot, "/ops invoice resend 12")
    assert state == "succeeded", message
    await bot.slash(ALICE, "/ops invoice resend 12")
    reply = await bot.response(containing="already in `billing-webhooks`")
    assert "(waiting); nothing to do" in reply["text"]
    await finish_all(queue, redis_url, queue_prefix)  # the platform's worker sends it
    assert await queue.getJobState("invoice-12") == "completed"
    _, state, message = await run(bot, "/ops invoice resend 12")
    assert state == "succeeded", message
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert "the previous job `invoice-12` (completed) will be replaced" in card
    assert await queue.getJobState("invoice-12") == "waiting"


async def test_approvers_clicking_at_once_add_one_job(bot: Harness, queue: Queue) -> None:
    await bot.slash(ALICE, "/ops billing nudge")
    request = await bot.requested()
    await asyncio.gather(bot.click(CAROL, request.id), bot.click(DAN, request.id))
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded", done.error
    await asyncio.sleep(0.5)
    counts = await queue.getJobCounts("waiting", "active", "delayed", "completed", "failed")
    assert sum(counts.values()) == 1
    job = await queue.getJob(f"opsbot-{request.id}")  # the default id: one job per request
    assert job is not None and job.data == {"by": ALICE, "request": request.id}


@pytest.mark.parametrize(("text", "expected"), [
    ("/ops invoice resend 0", "0 is outside 1–99999999"),
    ("/ops invoice resend 12:34", "must be a whole number"),
    ("/ops invoice resend ４７", "must be written with the digits 0-9"),
    ("/ops invoice resend 12 fax", "is not one of `email`, `sms`"),
    ("/ops invoice resend 12 ѕms", "U+0455 CYRILLIC SMALL LETTER DZE"),
    ("/ops billing nudge now", "unexpected argument `now`"),
])
async def test_hostile_values_are_refused(bot: Harness, queue: Queue, text: str, expected: str) -> None:
    status, body = await bot.slash(ALICE, text)
    assert status == 200 and expected in body, body
    assert await bot.last_request() is None
    assert sum((await queue.getJobCounts("waiting", "delayed")).values()) == 0


async def test_redis_down_at_the_command_and_after_approval(bot: Harness, config: Config, queue: Queue) -> None:
    live = config.queues["billing-webhooks"]
    dead = live.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    queues = bot.runtime.pipeline.ctx.config.queues
    queues["billing-webhooks"] = dead  # type: ignore[index]
    await bot.slash(ALICE, "/ops invoice resend 99")
    reply = await bot.response(containing="unavailable")
    assert "Redis for queue billing-webhooks" in reply["text"]
    assert await bot.last_request() is None

    queues["billing-webhooks"] = live  # type: ignore[index]
    await bot.slash(ALICE, "/ops billing nudge")
    request = await bot.requested()
    queues["billing-webhooks"] = dead  # type: ignore[index]
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "failed" and "Redis for queue billing-webhooks is unavailable" in (done.error or "")
    queues["billing-webhooks"] = live  # type: ignore[index]
    assert sum((await queue.getJobCounts("waiting", "delayed")).values()) == 0


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules" / "bullmq").exists(),
                    reason="needs node and `npm install` in tests/node (scripts/bootstrap does it)")
async def test_a_node_worker_takes_the_job(bot: Harness, redis_url: str, queue_prefix: str) -> None:
    _, state, message = await run(bot, "/ops invoice resend 4711")
    assert state == "succeeded", message
    proc = subprocess.run(["node", str(NODE_DIR / "worker.mjs"), redis_url, "billing-webhooks", queue_prefix, "1", "20000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[0]) == {
        "id": "invoice-4711", "name": "invoice.resend", "attemptsMade": 0,
        "data": {"invoiceId": 4711, "via": "email", "requestedBy": ALICE, "note": ""}}


@pytest_asyncio.fixture
async def slow_world(platform_db: str, redis_url: str, queue_prefix: str, slack: FakeSlack, state_db: str,
                     kubeconfig: str) -> AsyncIterator[tuple[Harness, TcpProxy]]:
    """The platform's Redis behind a proxy that can freeze (the bot's own Redis stays direct)."""
    proxy, via = await TcpProxy.for_url(redis_url)
    config = config_with_actions(platform_db, via, queue_prefix, ACTIONS)
    bot = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix)
    yield bot, proxy
    proxy.up()
    await asyncio.wait_for(bot.stop(), timeout=60)
    await proxy.stop()


async def test_a_frozen_platform_redis_is_answered_in_time(slow_world: tuple[Harness, TcpProxy], queue: Queue) -> None:
    bot, proxy = slow_world
    proxy.pause()
    started = time.monotonic()
    await bot.slash(ALICE, "/ops invoice resend 77")
    reply = await bot.response(containing="Redis for queue billing-webhooks", timeout=15)
    assert "no answer within 3 s" in reply["text"] and time.monotonic() - started < 8
    assert await bot.last_request() is None

    proxy.up()
    await bot.slash(ALICE, "/ops billing nudge")
    request = await bot.requested()
    proxy.pause()  # frozen while the job is being added: it may or may not be there
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "unknown", timeout=30)
    assert done.state.value == "unknown", done.error
    assert "may or may not be queued" in (done.error or "") and f"opsbot-{request.id}" in (done.error or "")
