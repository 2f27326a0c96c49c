"""Every Redis connection opsbot's own code opens goes through one ``RedisPools``: one blocking,
explicitly sized connection pool per Redis URL, built in ``Runtime.build`` and closed once in
``Runtime.stop``.

Why a *blocking* pool. redis-py's default pool refuses a command at once (``MaxConnectionsError``)
when all its connections are in use, so a burst of `/ops` commands was refused as "Redis is
unavailable" while Redis was fine (issue #8: 6–21 of 120 refused out of 200 concurrent). Here a
command waits for a connection, up to ``wait`` seconds; each holds one for a single round trip
(well under a millisecond on a LAN), so a burst is served in order instead of failing.

How many connections. Who draws from the pool of ``REDIS_URL`` at the same moment, per process:

* the `/ops` and button listener tasks (one per request in flight after the ack): each holds a
  connection only for its one round trip at a time: the user-group lookup (at most one per
  process at a time, see ``directory.py``), the rate-limit script, the enqueue of an approved
  request (one bullmq ``addJob`` script);
* the worker's executor, ``concurrency: 4`` jobs at a time (bot/worker.py), whose platform-queue
  calls (webhook replay: ``getJobState``/``add``) come from the pool of that queue's URL, the same
  pool when the platform's Redis is opsbot's own;
* the sweeper (one enqueue at a time) and the readiness probe (one PING);
* not bullmq's ``Worker``: it builds its own two single-connection clients from the URL (one of
  them sits in a blocking ``BZPOPMIN``), outside this pool, from ``worker_url`` (below).

That is about 6 steady users plus the burst, and the burst is bounded before it gets here: at
most 100 commands per process are in flight after their ack (bot/pipeline.py ``Admission``), each
using at most one connection at a time, for a round trip, between its other steps. ``MAX_CONNECTIONS
= 32`` leaves the burst 26 connections: at ~1 ms a round trip that is over 20 000 round trips a
second, far more than 100 commands in flight ask for (~3 round trips each), so a command waits for a
connection a few ms at most, against the 5 s wait; and it bounds what one replica may open, so ten
replicas stay far below Redis's default ``maxclients`` (10 000). Raise it only if ``opsbot is busy:
all 32 Redis connections …`` is ever seen with Redis healthy.

Failing closed. A connection that cannot be made fails within ``socket_connect_timeout`` (3 s;
at once when the port is closed) with one retry, as before: ``BackendUnavailable`` naming Redis.
A command still waiting for a connection after ``wait`` seconds is told why, honestly:

* a connection to Redis failed meanwhile → that error (Redis is down);
* no connection came back to the pool for the whole wait → Redis stopped answering (nothing on
  these pools blocks on purpose: bullmq's ``BZPOPMIN`` is on the Worker's own connection), so
  that is reported as Redis unavailable too;
* connections did come back, there were just more commands than connections → not an outage and
  not said to be one: ``Busy`` ("opsbot is busy: all 32 Redis connections were in use for 5 s").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from bot.errors import BackendUnavailable, Busy

MAX_CONNECTIONS = 32
WAIT_SECONDS = 5.0
# bullmq's Worker waits for jobs in BZPOPMIN on its own connection, for ``drainDelay`` seconds
# when the queue is empty (opsbot: 5) and at most 10 s (bullmq's ``maximumBlockTimeout``). Its
# clients are built by bullmq from the URL with redis-py's default read timeout, which in redis-py 8
# is 5 s: the same 5 s as the wait. Whenever the client's timeout fired before Redis's empty answer
# arrived, redis-py dropped the connection and retried the BZPOPMIN after bullmq's exponential
# backoff (2, 4, 8, 16, 20 s, growing for as long as the queue stayed empty), and a job added
# meanwhile waited for the backoff to end: the 2–20 s Approve → execute delays after idle periods
# (issue #8; bench/approve_latency.py --trace shows it). The worker's read timeout must exceed the
# longest wait (10 s) with room to spare; it still bounds a read from a Redis that stopped answering.
WORKER_SOCKET_TIMEOUT = 15.0


class PoolExhausted(RedisConnectionError):
    """Every connection of the pool stayed in use for the whole wait."""

    def __init__(self, max_connections: int, waited: float) -> None:
        super().__init__(f"all {max_connections} Redis connections were in use for {waited:g} s")
        self.max_connections, self.waited = max_connections, waited


class _Pool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, telling a busy pool (``PoolExhausted``) apart from a Redis that
    cannot be reached or does not answer (a ``ConnectionError`` saying so)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._failed_at = float("-inf")  # when a connection to Redis last could not be made
        self._failure: Exception | None = None
        self._released_at = float("-inf")  # when a connection last came back to the pool

    async def release(self, connection: Any) -> None:
        self._released_at = time.monotonic()
        await super().release(connection)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await super().get_connection()
        except RedisConnectionError as exc:
            # redis-py says "No connection available." with the wait's TimeoutError as the cause.
            if not isinstance(exc.__cause__, TimeoutError):
                self._failed_at, self._failure = time.monotonic(), exc
                raise
            waited = self.timeout or 0
            if self._failed_at >= started and self._failure is not None:
                raise RedisConnectionError(str(self._failure)) from exc
            if self._released_at < started:
                raise RedisConnectionError(f"Redis did not answer for {waited:g} s on any of opsbot's "
                                           f"{self.max_connections} connections") from exc
            raise PoolExhausted(self.max_connections, waited) from exc
        except (RedisError, OSError) as exc:
            self._failed_at, self._failure = time.monotonic(), exc
            raise


class RedisPools:
    """Owns the connection pools (one per Redis URL) and the one client over each."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS, wait: float = WAIT_SECONDS) -> None:
        self.max_connections, self.wait = max_connections, wait
        self._clients: dict[str, aioredis.Redis] = {}

    def client(self, url: str) -> aioredis.Redis:
        """The client for ``url``; shared, so callers never close it (``close`` does, once)."""
        if url not in self._clients:
            pool = _Pool.from_url(url, max_connections=self.max_connections, timeout=self.wait, decode_responses=True,
                                  socket_connect_timeout=3, socket_timeout=10, retry=Retry(NoBackoff(), 1))
            # A client given a pool never closes it (auto_close_connection_pool is False): bullmq's
            # Queue.close() calls client.aclose(), and that must not cut the other users off.
            self._clients[url] = aioredis.Redis(connection_pool=pool)
        return self._clients[url]

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.connection_pool.aclose()


def worker_url(url: str) -> str:
    """``url`` for bullmq's ``Worker``: the same server and credentials, with a read timeout
    (``socket_timeout``) of ``WORKER_SOCKET_TIMEOUT`` unless the URL already asks for a longer one."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [v for k, v in query if k == "socket_timeout"]
    with contextlib.suppress(ValueError):
        if given and float(given[0]) >= WORKER_SOCKET_TIMEOUT:
            return url
    query = [(k, v) for k, v in query if k != "socket_timeout"] + [("socket_timeout", f"{WORKER_SOCKET_TIMEOUT:g}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


@contextlib.asynccontextmanager
async def redis_errors(what: str) -> AsyncIterator[None]:
    """redis-py's exceptions → ours: ``Busy`` for an exhausted pool, else ``BackendUnavailable(what)``."""
    try:
        yield
    except PoolExhausted as exc:
        raise Busy("Redis", str(exc)) from exc
    except (RedisError, OSError) as exc:
        raise BackendUnavailable(what, f"{type(exc).__name__}: {str(exc).rstrip('.')}") from exc
