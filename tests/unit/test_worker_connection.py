"""bullmq's Worker gets a connection whose read timeout outlasts its blocking wait (issue #8).

redis-py 8 reads with a 5 s timeout by default, and bullmq's idle BZPOPMIN waits 5 s too: when the
client's timeout won the race, redis-py dropped the connection and retried after bullmq's backoff
(2, 4, 8, 16, 20 s), and an approved job waited for it (bench/approve_latency.py measures it)."""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import parse_url

from bot.adapters.redis_pools import WORKER_SOCKET_TIMEOUT, worker_url

# bullmq.worker.default_maximum_block_timeout: the longest BZPOPMIN bullmq issues (delayed jobs);
# an empty queue waits drainDelay (bot/worker.py: 5 s).
BULLMQ_LONGEST_BLOCK = 10


def opts(url: str) -> dict[str, Any]:
    """What redis-py (and so bullmq, which calls ``redis.from_url``) makes of ``url``."""
    return dict(parse_url(url))


def test_the_worker_read_timeout_outlasts_the_longest_blocking_wait() -> None:
    import bullmq.worker

    assert bullmq.worker.default_maximum_block_timeout == BULLMQ_LONGEST_BLOCK  # if bullmq changes it, look again
    assert opts(worker_url("redis://127.0.0.1:6379/0"))["socket_timeout"] == WORKER_SOCKET_TIMEOUT
    assert WORKER_SOCKET_TIMEOUT >= BULLMQ_LONGEST_BLOCK + 5


def test_the_worker_url_keeps_the_server_credentials_and_options() -> None:
    url = worker_url("rediss://user:p%40ss@redis.internal:6380/3?health_check_interval=10")
    kwargs = opts(url)
    assert url.startswith("rediss://user:p%40ss@redis.internal:6380/3?")
    assert (kwargs["username"], kwargs["password"], kwargs["host"], kwargs["port"], kwargs["db"]) == (
        "user", "p@ss", "redis.internal", 6380, 3)
    assert kwargs["health_check_interval"] == 10 and kwargs["socket_timeout"] == WORKER_SOCKET_TIMEOUT
    assert opts(worker_url("unix:///run/redis.sock?db=2"))["path"] == "/run/redis.sock"


def test_a_shorter_timeout_in_the_url_is_raised_a_longer_one_kept() -> None:
    assert opts(worker_url("redis://h:1/0?socket_timeout=5"))["socket_timeout"] == WORKER_SOCKET_TIMEOUT
    assert worker_url("redis://h:1/0?socket_timeout=60") == "redis://h:1/0?socket_timeout=60"
