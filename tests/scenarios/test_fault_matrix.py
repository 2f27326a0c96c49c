"""The fault matrix of issue 8: opsbot's own PostgreSQL and Redis taken down (connections reset)
or frozen (bytes stop, as with SIGSTOP) at each stage of a request — the click, the hand-over to the
worker, the worker's claim — through TCP proxies in front of the real servers. Each case: the person
is answered and told what happened, nothing runs twice or half, and after recovery the request ends
where it should with the card, the thread and the audit chain all right."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.config import Config
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, CAROL, EVE
from tests.faults.proxy import TcpProxy
from tests.harness import Harness


class World:
    def __init__(self, bot: Harness, db: TcpProxy, redis: TcpProxy) -> None:
        self.bot, self.db, self.redis = bot, db, redis


@pytest_asyncio.fixture
async def world(config: Config, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str, queue_prefix: str,
                tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    db, db_url = await TcpProxy.for_url(state_db)
    rds, redis_via_proxy = await TcpProxy.for_url(redis_url)
    with_worker = not getattr(request, "param", {}).get("worker_later", False)
    bot = await Harness.start(config=config, slack=slack, database_url=db_url, redis_url=redis_via_proxy, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix, spool_dir=str(tmp_path / "spool"), with_worker=with_worker)
    bot.runtime.worker.requeue_after = timedelta(seconds=1)  # the sweeper's hand-over retry, fast for the test
    yield World(bot, db, rds)
    db.up()
    rds.up()
    await asyncio.wait_for(bot.stop(), timeout=60)
    await db.stop()
    await rds.stop()


def replicas(kube: KubeApiServer) -> int:
    return int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"])


def scale_patches(kube: KubeApiServer) -> int:
    return sum(1 for r in kube.cluster.requests if r[0] == "PATCH" and r[1].endswith("/deployments/nova-worker/scale"))


async def ends_right(w: World, request_id: str, kube: KubeApiServer) -> None:
    """After recovery: succeeded once, the change made once, the chain verifies, the card shows it."""
    done = await w.bot.state_of(request_id, "succeeded", "failed", "stale", "unknown", timeout=45)
    assert done.state.value == "succeeded", done.error
    assert replicas(kube) == 6 and scale_patches(kube) == 1
    assert (await w.bot.audit_events(request_id)).count("started") == 1
    report = await w.bot.runtime.audit.log.verify()
    assert report.ok, report.summary()

    async def card_final() -> bool:
        card = next((m for m in w.bot.slack.in_channel(Harness.INCIDENT) if m.ts == done.card_ts), None)
        return card is not None and "succeeded" in card.all_text()

    assert await w.bot.eventually(card_final, timeout=20, what="the card to show the final state")


async def test_postgres_down_at_the_click(world: World, kube: KubeApiServer) -> None:
    w = world
    await w.bot.slash(ALICE, "/ops scale worker 6")
    request = await w.bot.requested()
    w.db.down()
    status, _ = await w.bot.click(CAROL, request.id, "approve", card_ts=request.card_ts)
    assert status == 200, "the click is acked at once, whatever the database does"

    async def told() -> str | None:
        return next((m.text for m in w.bot.slack.ephemeral_to(CAROL) if "not counted" in m.text), None)

    text = await w.bot.eventually(told, timeout=30, what="the approver to be told the click did not count")
    assert "opsbot database is unavailable" in text and "click again" in text
    assert replicas(kube) == 3 and scale_patches(kube) == 0
    w.db.up()
    again = await w.bot.runtime.store.get(request.id)
    assert again is not None and again.state.value == "pending_approval" and again.approvals == (), "nothing half-counted"
    async def refused() -> list[dict[str, Any]] | None:  # kept in the spool while the database was down, appended after
        rows = [r for r in await w.bot.runtime.audit.log.rows() if r["event"] == "vote_refused"]
        return rows or None

    rows = await w.bot.eventually(refused, timeout=30, what="the refused click in the audit trail")
    assert rows[-1]["result"]["why"] == "backend_unavailable"
    await w.bot.click(CAROL, request.id, "approve")
    await ends_right(w, request.id, kube)


async def test_postgres_frozen_at_the_click_holds_the_click_and_says_so(world: World, kube: KubeApiServer) -> None:
    """A frozen database (SIGSTOP, a black hole) neither drops the click nor makes opsbot guess:
    the approver is told it is held, and once the database answers it counts — once."""
    w = world
    await w.bot.slash(ALICE, "/ops scale worker 6")
    request = await w.bot.requested()
    w.db.pause()
    await w.bot.click(CAROL, request.id, "approve", card_ts=request.card_ts)

    async def told() -> str | None:
        return next((m.text for m in w.bot.slack.ephemeral_to(CAROL) if "slow to answer" in m.text), None)

    assert "No need to click again" in await w.bot.eventually(told, timeout=15, what="the approver to be told the click is held")
    assert replicas(kube) == 3
    w.db.up()
    await ends_right(w, request.id, kube)


async def test_postgres_frozen_at_the_command_says_it_is_waiting_then_answers(world: World, kube: KubeApiServer) -> None:
    w = world
    await w.bot.slash(EVE, "/ops help")  # the pool has its connections; now they stop answering
    await w.bot.response(containing="opsbot commands")
    w.db.pause()
    status, _ = await w.bot.slash(ALICE, "/ops scale worker 6")
    assert status == 200
    held = await w.bot.response(containing="Still working on it", timeout=15)
    assert "Nothing is guessed" in held["text"]
    w.db.up()
    request = await w.bot.requested(timeout=45)
    await w.bot.click(CAROL, request.id, "approve")
    await ends_right(w, request.id, kube)


@pytest.mark.parametrize("fault", ["down", "pause"])
async def test_redis_lost_when_the_approved_request_is_handed_to_the_worker(world: World, kube: KubeApiServer, fault: str) -> None:
    w = world
    await w.bot.slash(ALICE, "/ops scale worker 6")
    request = await w.bot.requested()
    getattr(w.redis, fault)()
    await w.bot.click(CAROL, request.id, "approve")
    approved = await w.bot.state_of(request.id, "approved", timeout=30)
    assert approved.state.value == "approved", "the approval itself is in PostgreSQL and counts"

    async def thread_says() -> bool:
        return any("nothing has run yet" in m.text for m in w.bot.slack.thread(Harness.INCIDENT, approved.card_ts or ""))

    await w.bot.eventually(thread_says, timeout=30, what="the thread to say it is approved but not yet queued")
    await asyncio.sleep(1.5)
    assert replicas(kube) == 3, "nothing runs while the queue is unreachable"
    w.redis.up()
    await ends_right(w, request.id, kube)


@pytest.mark.parametrize("world", [{"worker_later": True}], indirect=True)
@pytest.mark.parametrize("fault", ["down", "pause"])
async def test_postgres_lost_when_the_worker_claims_the_job(world: World, kube: KubeApiServer, fault: str) -> None:
    """The job is taken from the queue while opsbot's database is unreachable: the claim fails, the
    BullMQ job ends failed. When the database is back the sweeper hands the still-approved request
    over again — the failed job of the same id must not swallow it — and it runs once."""
    w = world
    await w.bot.slash(ALICE, "/ops scale worker 6")
    request = await w.bot.requested()
    await w.bot.click(CAROL, request.id, "approve")
    await w.bot.state_of(request.id, "approved")
    queue = w.bot.runtime.actions
    await w.bot.eventually(lambda: _is(queue.job_state(request.id), "waiting"), what="the job to be queued")
    getattr(w.db, fault)()
    await w.bot.runtime.worker.start()

    async def job_failed() -> bool:
        return await queue.job_state(request.id) == "failed"

    if fault == "down":
        await w.bot.eventually(job_failed, timeout=40, what="the worker's claim to fail while the database is away")
    else:  # frozen: the claim waits for the database (it neither fails nor runs without it)
        await w.bot.eventually(lambda: _is(queue.job_state(request.id), "active", "failed"), timeout=20, what="the job to be taken")
        await asyncio.sleep(2)
    assert replicas(kube) == 3 and scale_patches(kube) == 0
    w.db.up()
    await ends_right(w, request.id, kube)


async def _is(state: Awaitable[str | None], *wanted: str) -> bool:
    return await state in wanted
