"""Redis and BullMQ: the platforms' queues (webhook replay, `/ops queue …`) and opsbot's own action queue.

Jobs are added through the ``bullmq`` Python package, which runs the same Lua scripts as Node
BullMQ, so the platforms' Node workers read them (tests/node/worker.mjs proves it).

Connections come from ``RedisPools`` (bot/adapters/redis_pools.py): one bounded, blocking pool
per Redis URL, shared with the user-group cache and the rate limiter, with short timeouts and a
single retry, so that when Redis is down the bot refuses within seconds and says so, not after the
minutes bullmq's default retry policy would wait.

What `/ops queue …` does to a platform queue is what bull-board does, through the same bullmq
calls: ``getJobCounts``, ``getJobs``, ``Job.retry`` (the ``reprocessJob`` script), ``pause``/
``resume`` (the ``paused`` flag in the queue's meta hash, which Node workers honour) and
``Queue.clean``. The one read bullmq has no call for, how many finished jobs are older than a
time, is a ``ZCOUNT`` on the set ``clean`` removes from (scored by ``finishedOn``).

A job id is looked up with ``getJobState`` before its hash is read: the state script only asks
whether the id is a member of the queue's sets and lists, whereas reading ``<prefix>:<queue>:<id>``
for an id such as ``meta`` or ``1:logs`` would read one of the queue's own keys as if it were a job.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from bullmq import Job
from bullmq import Queue as BullQueue

from bot.adapters.redis_pools import RedisPools, redis_errors
from bot.config import Queue

Obj = dict[str, Any]
ACTION_JOB = "execute"
COUNTED_STATES = ("waiting", "paused", "prioritized", "active", "delayed", "failed", "completed", "waiting-children")
FINISHED_STATES = ("completed", "failed")


def _job(job: Job) -> Obj:
    """What commands may know of a job (never its data: it can hold anybody's personal data)."""
    return {"id": str(job.id), "name": job.name, "attemptsMade": int(job.attemptsMade or 0),
            "failedReason": job.failedReason, "timestamp": job.timestamp or None,
            "processedOn": job.processedOn or None, "finishedOn": job.finishedOn or None}


class QueueAdapter:
    """The platforms' BullMQ queues, by config entry."""

    def __init__(self, pools: RedisPools) -> None:
        self._pools = pools
        self._queues: dict[tuple[str, str, str], BullQueue] = {}

    def _queue(self, spec: Queue) -> BullQueue:
        key = (spec.redis_url, spec.prefix, spec.name)
        if key not in self._queues:
            self._queues[key] = BullQueue(spec.name, {"connection": self._pools.client(spec.redis_url), "prefix": spec.prefix})
        return self._queues[key]

    async def job_state(self, queue: Queue, job_id: str) -> str | None:
        async with redis_errors(f"Redis for queue {queue.name}"):
            state = await self._queue(queue).getJobState(job_id)
        return None if state in (None, "unknown") else str(state)

    async def add_job(self, queue: Queue, *, name: str, data: Obj, job_id: str, replace_finished: bool,
                      opts: Obj | None = None) -> str:
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            if replace_finished and await q.getJobState(job_id) in ("completed", "failed"):
                await q.remove(job_id)
            await q.add(name, data, {**(opts or {"attempts": 3, "backoff": {"type": "exponential", "delay": 5000}}), "jobId": job_id})
            return str(await q.getJobState(job_id))

    async def job_counts(self, queue: Queue) -> dict[str, int]:
        async with redis_errors(f"Redis for queue {queue.name}"):
            counts = await self._queue(queue).getJobCounts(*COUNTED_STATES)
        return {state: int(counts.get(state) or 0) for state in COUNTED_STATES}

    async def is_paused(self, queue: Queue) -> bool:
        async with redis_errors(f"Redis for queue {queue.name}"):
            return bool(await self._queue(queue).isPaused())

    async def set_paused(self, queue: Queue, paused: bool) -> None:
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            if paused:
                await q.pause()
                return
            # Resuming moves jobs of a paused list (see oldest_waiting) back, 7000 per call.
            for _ in range(1000):
                if not await q.resume():
                    return

    async def oldest_waiting(self, queue: Queue) -> Obj | None:
        # Jobs are pushed at the head of the wait list and taken from its tail, so ascending order
        # starts with the next job a worker takes. A queue paused by this bullmq keeps its jobs
        # there; one paused by Node BullMQ (5.x renames the wait list) has them in the `paused`
        # list: both are read.
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            tails = [*await q.getJobs(["waiting"], 0, 0, True), *await q.getJobs(["paused"], 0, 0, True)]
        return _job(min(tails, key=lambda j: j.timestamp or 0)) if tails else None

    async def jobs(self, queue: Queue, state: str, *, count: int, oldest_first: bool) -> list[Obj]:
        if count <= 0:
            return []
        async with redis_errors(f"Redis for queue {queue.name}"):
            jobs = await self._queue(queue).getJobs([state], 0, count - 1, oldest_first)
        return [_job(j) for j in jobs]

    async def job(self, queue: Queue, job_id: str) -> Obj | None:
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            state = await q.getJobState(job_id)
            if state in (None, "unknown"):
                return None
            found = await q.getJob(job_id)
        return None if found is None else {**_job(found), "state": str(state)}

    async def retry_job(self, queue: Queue, job_id: str) -> str:
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            state = await q.getJobState(job_id)
            if state != "failed":
                return "missing" if state in (None, "unknown") else str(state)
            job = await q.getJob(job_id)
            if job is None:
                return "missing"
            try:
                await job.retry("failed")
            except TypeError:  # bullmq's answer when the script found the job gone or no longer failed
                state = await q.getJobState(job_id)
                if state == "failed":
                    raise
                return "missing" if state in (None, "unknown") else str(state)
        return "retried"

    async def count_finished(self, queue: Queue, state: str, *, finished_before_ms: int) -> int:
        if state not in FINISHED_STATES:
            raise ValueError(f"only finished jobs are counted by age, not {state!r}")
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            return int(await self._pools.client(queue.redis_url).zcount(q.toKey(state), 0, finished_before_ms))

    async def clean(self, queue: Queue, state: str, *, finished_before_ms: int, limit: int) -> list[str]:
        if state not in FINISHED_STATES:
            raise ValueError(f"only finished jobs are cleaned, not {state!r}")
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            # bullmq takes a grace period before now; it is computed here, right before the call,
            # so that the script's cutoff is this one (to the millisecond).
            grace = max(0, round(time.time() * 1000) - finished_before_ms)
            removed = await q.clean(grace, limit, state)
        return [str(i) for i in removed or []]

    async def close(self) -> None:
        """The bullmq queues; the connections are the pools' (``RedisPools.close``)."""
        for q in self._queues.values():
            await q.close()


class ActionQueue:
    """opsbot's own queue: an approved request becomes one job whose id is the request id, so
    enqueueing twice (two replicas, a sweeper retry) never makes two executions."""

    def __init__(self, redis: aioredis.Redis, name: str, prefix: str = "bull") -> None:
        self.name, self.prefix = name, prefix
        self._client = redis
        self._queue = BullQueue(name, {"connection": self._client, "prefix": prefix})

    async def enqueue(self, request_id: str) -> None:
        """Add the request's job unless it is already waiting or running. A *finished* job of the
        same id is removed first: BullMQ ignores an add whose id exists, so a job that failed (its
        claim met a database outage) would otherwise swallow every later hand-over and leave the
        request approved for ever. Re-adding is safe: the claim (approved → running) is one
        conditional UPDATE, so a request runs at most once however many jobs name it."""
        async with redis_errors("Redis (opsbot's action queue)"):
            if await self._queue.getJobState(request_id) in ("completed", "failed"):
                await self._queue.remove(request_id)
            await self._queue.add(ACTION_JOB, {"requestId": request_id},
                                  {"jobId": request_id, "removeOnComplete": 1000, "removeOnFail": 5000})

    async def job_state(self, request_id: str) -> str | None:
        async with redis_errors("Redis (opsbot's action queue)"):
            state = await self._queue.getJobState(request_id)
        return None if state in (None, "unknown") else str(state)

    async def ping(self) -> None:
        async with redis_errors("Redis"):
            await self._client.ping()

    async def close(self) -> None:
        await self._queue.close()  # the connections are the pools' (RedisPools.close)
