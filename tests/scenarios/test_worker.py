"""The worker's promises: nothing approved is lost, nothing runs twice, one action per target,
and a worker lost mid-action is never silently retried."""

from __future__ import annotations

import psycopg

from bot.domain import RequestState
from bot.errors import BackendUnavailable
from bot.sandbox.kube_apiserver import KubeApiServer
from tests.conftest import ALICE, CAROL
from tests.harness import Harness


def replicas(kube: KubeApiServer) -> int:
    return int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"])


async def test_an_approved_request_whose_job_was_lost_still_runs_once(bot: Harness, kube: KubeApiServer, state_db: str) -> None:
    # Approve while the action queue is unreachable (Redis blip at the moment of the click).
    real = bot.runtime.actions.enqueue
    failures: list[str] = []

    async def broken(request_id: str) -> None:
        failures.append(request_id)
        raise BackendUnavailable("Redis (opsbot's action queue)", "ConnectionError: connection refused")

    bot.runtime.actions.enqueue = broken  # type: ignore[method-assign]
    await bot.slash(ALICE, "/ops scale worker 8")
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    await bot.state_of(request.id, "approved")
    await bot.eventually(lambda: _async(failures), what="the failed enqueue")
    assert replicas(kube) == 3
    thread = await bot.eventually(lambda: _async(bot.slack.thread(Harness.INCIDENT, request.card_ts or "")), what="a notice")
    assert "opsbot will queue it as soon as the queue is reachable again" in thread[-1].text
    # Redis is back; the sweeper finds the approved request and enqueues it (job id = request id).
    bot.runtime.actions.enqueue = real  # type: ignore[method-assign]
    bot.runtime.worker.requeue_after = __import__("datetime").timedelta(seconds=0)
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state is RequestState.SUCCEEDED and replicas(kube) == 8
    assert (await bot.audit_events(request.id)).count("started") == 1


async def test_one_action_per_target(bot: Harness, kube: KubeApiServer, state_db: str) -> None:
    bot.runtime.executor.lock_wait = 0.5
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    # Another replica holds the target's lock (an action on nova-worker is running there).
    with psycopg.connect(state_db, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", ("deployment/production/nova/nova-worker",))
        await bot.click(CAROL, request.id)
        done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state is RequestState.FAILED
    assert "another action on worker (nova/nova-worker) is running" in (done.error or "")
    assert replicas(kube) == 3


async def test_a_worker_lost_mid_action_makes_the_request_unknown_not_retried(bot: Harness, state_db: str) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    # Simulate a worker that claimed the request and died: running, heartbeat long stopped.
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE ops_requests SET state = 'running', claimed_by = 'dead-worker', claimed_at = now() - interval '1 hour',"
                     " heartbeat_at = now() - interval '1 hour' WHERE id = %s", (request.id,))
    done = await bot.state_of(request.id, "unknown")
    assert "worker lost" in (done.error or "")
    thread = await bot.eventually(lambda: _async(bot.slack.thread(Harness.INCIDENT, request.card_ts or "")), what="thread")
    assert "It was not retried" in thread[-1].text
    assert (await bot.audit_events(request.id))[-1] == "unknown"


async def _async(value: object) -> object:
    return value


async def test_the_workers_redis_connections_outlast_its_blocking_wait(bot: Harness) -> None:
    # The idle BZPOPMIN must end by Redis's empty answer, never by the client's read timeout: that
    # dropped the connection and retried after a 2–20 s backoff while approved jobs waited (issue #8).
    worker = bot.runtime.worker._worker
    longest_wait = max(worker.opts["drainDelay"], worker.maximumBlockTimeout)
    for client in (worker.bclient, worker.client):
        pool = client.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)  # what each (re)connection gets; not connected
        assert connection.socket_timeout is not None and connection.socket_timeout >= longest_wait + 5


async def test_an_environment_frozen_after_approval_is_not_changed(bot: Harness, kube: KubeApiServer) -> None:
    """The policy a replica runs with can change under an approved request (a restart with a new
    config): a freeze is checked again just before running, the rest of the decision is not."""
    import dataclasses

    await bot.slash(ALICE, "/ops scale worker 7")
    request = await bot.requested()
    ctx = bot.runtime.executor.ctx
    frozen = ctx.config.model_copy(update={"environments": {"production": ctx.config.environments["production"].model_copy(
        update={"frozen": "INC-9 change freeze"})}})
    bot.runtime.executor.ctx = dataclasses.replace(ctx, config=frozen)
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "failed" and "production is frozen now (INC-9 change freeze)" in (done.error or "")
    assert int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"]) == 3
