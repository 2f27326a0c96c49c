"""Redis and BullMQ: the platforms' queues (webhook replay) and opsbot's own action queue.

Jobs are added through the ``bullmq`` Python package, which runs the same Lua scripts as Node
BullMQ, so the platforms' Node workers read them (tests/node/worker.mjs proves it).

redis-py clients are built here with short timeouts and a single retry: when Redis is down the
bot must refuse within seconds and say so, not hang for the minutes bullmq's default retry policy
would wait.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from bullmq import Queue as BullQueue
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from bot.config import Queue
from bot.errors import BackendUnavailable

Obj = dict[str, Any]
ACTION_JOB = "execute"


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=10,
                             retry=Retry(NoBackoff(), 1), single_connection_client=False)


@contextlib.asynccontextmanager
async def _redis_errors(what: str) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BackendUnavailable(what, f"{type(exc).__name__}: {exc}") from exc


class QueueAdapter:
    """The platforms' BullMQ queues, by config entry."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, str, str], BullQueue] = {}
        self._clients: dict[str, aioredis.Redis] = {}

    def _queue(self, spec: Queue) -> BullQueue:
        key = (spec.redis_url, spec.prefix, spec.name)
        if key not in self._queues:
            client = self._clients.setdefault(spec.redis_url, redis_client(spec.redis_url))
            self._queues[key] = BullQueue(spec.name, {"connection": client, "prefix": spec.prefix})
        return self._queues[key]

    async def job_state(self, queue: Queue, job_id: str) -> str | None:
        async with _redis_errors(f"Redis for queue {queue.name}"):
            state = await self._queue(queue).getJobState(job_id)
        return None if state in (None, "unknown") else str(state)

    async def add_job(self, queue: Queue, *, name: str, data: Obj, job_id: str, replace_finished: bool) -> str:
        q = self._queue(queue)
        async with _redis_errors(f"Redis for queue {queue.name}"):
            if replace_finished and await q.getJobState(job_id) in ("completed", "failed"):
                await q.remove(job_id)
            await q.add(name, data, {"jobId": job_id, "attempts": 3, "backoff": {"type": "exponential", "delay": 5000}})
            return str(await q.getJobState(job_id))

    async def close(self) -> None:
        for q in self._queues.values():
            await q.close()
        for c in self._clients.values():
            await c.aclose()


class ActionQueue:
    """opsbot's own queue: an approved request becomes one job whose id is the request id, so
    enqueueing twice (two replicas, a sweeper retry) never makes two executions."""

    def __init__(self, redis_url: str, name: str, prefix: str = "bull") -> None:
        self.redis_url, self.name, self.prefix = redis_url, name, prefix
        self._client = redis_client(redis_url)
        self._queue = BullQueue(name, {"connection": self._client, "prefix": prefix})

    async def enqueue(self, request_id: str) -> None:
        async with _redis_errors("Redis (opsbot's action queue)"):
            await self._queue.add(ACTION_JOB, {"requestId": request_id},
                                  {"jobId": request_id, "removeOnComplete": 1000, "removeOnFail": 5000})

    async def ping(self) -> None:
        async with _redis_errors("Redis"):
            await self._client.ping()

    async def close(self) -> None:
        await self._queue.close()
        await self._client.aclose()
