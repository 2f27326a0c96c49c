"""Redis and BullMQ: the platforms' queues (webhook replay) and opsbot's own action queue.

Jobs are added through the ``bullmq`` Python package, which runs the same Lua scripts as Node
BullMQ, so the platforms' Node workers read them (tests/node/worker.mjs proves it).

Connections come from ``RedisPools`` (bot/adapters/redis_pools.py): one bounded, blocking pool
per Redis URL, shared with the user-group cache and the rate limiter, with short timeouts and a
single retry, so that when Redis is down the bot refuses within seconds and says so, not after the
minutes bullmq's default retry policy would wait.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from bullmq import Queue as BullQueue

from bot.adapters.redis_pools import RedisPools, redis_errors
from bot.config import Queue

Obj = dict[str, Any]
ACTION_JOB = "execute"


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

    async def add_job(self, queue: Queue, *, name: str, data: Obj, job_id: str, replace_finished: bool) -> str:
        q = self._queue(queue)
        async with redis_errors(f"Redis for queue {queue.name}"):
            if replace_finished and await q.getJobState(job_id) in ("completed", "failed"):
                await q.remove(job_id)
            await q.add(name, data, {"jobId": job_id, "attempts": 3, "backoff": {"type": "exponential", "delay": 5000}})
            return str(await q.getJobState(job_id))

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
        async with redis_errors("Redis (opsbot's action queue)"):
            await self._queue.add(ACTION_JOB, {"requestId": request_id},
                                  {"jobId": request_id, "removeOnComplete": 1000, "removeOnFail": 5000})

    async def ping(self) -> None:
        async with redis_errors("Redis"):
            await self._client.ping()

    async def close(self) -> None:
        await self._queue.close()  # the connections are the pools' (RedisPools.close)
