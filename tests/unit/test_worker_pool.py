"""A worker's connection pool leaves room for queries while every job slot and both posters hold
their lock connections (bench/workers_e2e.py showed a worker's checkouts waiting ~0.3 s each when
these six took six of its ten connections)."""

from __future__ import annotations

import asyncio
import contextlib

from bot.runtime import QUERY_CONNECTIONS, state_store
from bot.worker import CONCURRENCY


async def test_job_and_poster_locks_leave_the_query_connections_free(state_db: str) -> None:
    store = state_store(state_db, timeout=3)  # the timeout only bounds a failure
    await store.open()
    try:
        async with contextlib.AsyncExitStack() as held:
            for i in range(CONCURRENCY):  # every job slot running an action, its target locked
                assert await held.enter_async_context(store.target_lock(f"deployment/nova/svc-{i}", wait=0))
            for poster in ("audit-outbox", "opsbot-notices-poster"):  # both posters mid-round
                assert await held.enter_async_context(store.target_lock(poster, wait=0))
            all_in = asyncio.Barrier(QUERY_CONNECTIONS)

            async def query() -> None:  # each keeps its connection until all of them have one
                async with store.connection() as conn:
                    await conn.execute("SELECT 1")
                    await all_in.wait()

            await asyncio.gather(*(query() for _ in range(QUERY_CONNECTIONS)))
    finally:
        await store.close()
