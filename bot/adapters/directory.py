"""Who is in which Slack user group, cached in Redis with a short TTL.

Roles can be granted through Slack user groups (``roles.<r>.usergroups``). Membership comes from
``usergroups.users.list`` (the Slack edge supplies the call) and is cached per group in Redis for
``slack.usergroup_cache`` seconds, so a click does not cost a Slack API call and two replicas agree.
When Slack (or Redis) cannot answer, this raises ``BackendUnavailable``: the caller refuses, it
never assumes a membership it could not check.

Every `/ops` command asks this (``Approvals.with_groups``), so it is kept cheap under a burst:

* all configured groups are read in one round trip (a pipeline: one ``MGET`` and each key's
  ``PTTL``), not one ``GET`` per group;
* the answer is also kept in this process for at most ``local_ttl`` seconds (1 s), and never past
  the Redis entry's own expiry, so ``slack.usergroup_cache`` still bounds how stale a membership
  can be; a burst from one replica costs Redis one round trip a second;
* concurrent callers share one lookup in flight instead of each starting their own.

A failed lookup is never cached: the next caller tries again, and everyone waiting on it is refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from bot.adapters.redis_pools import redis_errors
from bot.errors import BackendUnavailable

FetchMembers = Callable[[str], Awaitable[list[str]]]
Memberships = dict[str, frozenset[str]]


class UserGroupDirectory:
    def __init__(self, redis: aioredis.Redis, fetch: FetchMembers, *, ttl: int, groups: frozenset[str], prefix: str = "opsbot",
                 local_ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis, self._fetch, self._ttl, self._prefix = redis, fetch, max(1, ttl), prefix
        self._groups = sorted(groups)
        self._local_ttl, self._clock = local_ttl, clock
        self._local: Memberships | None = None
        self._local_until = float("-inf")
        self._lookup: asyncio.Future[Memberships] | None = None

    def _key(self, group: str) -> str:
        return f"{self._prefix}:usergroup:{group}"

    async def groups_of(self, user_id: str) -> frozenset[str]:
        """The configured user groups ``user_id`` belongs to (only groups the policy names are asked)."""
        memberships = await self._memberships()
        return frozenset(g for g, members in memberships.items() if user_id in members)

    async def _memberships(self) -> Memberships:
        if self._local is not None and self._clock() < self._local_until:
            return self._local
        if self._lookup is None:
            lookup = self._lookup = asyncio.ensure_future(self._load())
            lookup.add_done_callback(self._lookup_done)
        # shield: a caller that gives up (its request cancelled) does not cancel the others' lookup.
        return await asyncio.shield(self._lookup)

    def _lookup_done(self, lookup: asyncio.Future[Memberships]) -> None:
        if self._lookup is lookup:
            self._lookup = None
        if not lookup.cancelled():
            lookup.exception()  # retrieved here too, in case every caller gave up waiting

    async def _load(self) -> Memberships:
        keys = [self._key(g) for g in self._groups]
        async with redis_errors("Redis (user-group cache)"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.mget(keys)
                for key in keys:
                    pipe.pttl(key)
                values, *ttls_ms = await pipe.execute()
        now = self._clock()
        until = now + min(self._local_ttl, self._ttl)
        memberships: Memberships = {}
        missing: list[str] = []
        for group, value, ttl_ms in zip(self._groups, values, ttls_ms, strict=True):
            if value is None:
                missing.append(group)
                continue
            memberships[group] = frozenset(json.loads(value))
            if ttl_ms >= 0:
                until = min(until, now + ttl_ms / 1000)
            elif ttl_ms == -2:  # expired between the MGET and the PTTL: good for this call only
                until = now
        fetched: dict[str, list[str]] = {}
        try:
            for group in missing:  # one at a time, in order: Slack rate-limits usergroups.users.list
                try:
                    fetched[group] = await self._fetch(group)
                except Exception as exc:
                    raise BackendUnavailable("Slack user groups", f"usergroups.users.list({group}) failed: {exc}") from exc
        finally:
            if fetched:  # what Slack did answer is cached even when a later group failed
                async with redis_errors("Redis (user-group cache)"):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for group, members in fetched.items():
                            pipe.set(self._key(group), json.dumps(members), ex=self._ttl)
                        await pipe.execute()
        memberships.update((g, frozenset(m)) for g, m in fetched.items())
        self._local, self._local_until = memberships, until
        return memberships
