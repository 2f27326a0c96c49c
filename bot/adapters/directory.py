"""Who is in which Slack user group, cached in Redis with a short TTL.

Roles can be granted through Slack user groups (``roles.<r>.usergroups``). Membership comes from
``usergroups.users.list`` (the Slack edge supplies the call) and is cached per group in Redis for
``slack.usergroup_cache`` seconds, so a click does not cost a Slack API call and two replicas agree.
When Slack (or Redis) cannot answer, this raises ``BackendUnavailable``: the caller refuses, it
never assumes a membership it could not check.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from bot.adapters.queues import redis_client
from bot.errors import BackendUnavailable

FetchMembers = Callable[[str], Awaitable[list[str]]]


class UserGroupDirectory:
    def __init__(self, redis_url: str, fetch: FetchMembers, *, ttl: int, groups: frozenset[str], prefix: str = "opsbot") -> None:
        self._redis = redis_client(redis_url)
        self._fetch, self._ttl, self._groups, self._prefix = fetch, ttl, groups, prefix

    async def _members(self, group: str) -> list[str]:
        key = f"{self._prefix}:usergroup:{group}"
        try:
            cached = await self._redis.get(key)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("Redis (user-group cache)", f"{type(exc).__name__}: {exc}") from exc
        if cached is not None:
            return list(json.loads(cached))
        try:
            members = await self._fetch(group)
        except Exception as exc:
            raise BackendUnavailable("Slack user groups", f"usergroups.users.list({group}) failed: {exc}") from exc
        try:
            await self._redis.set(key, json.dumps(members), ex=max(1, self._ttl))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("Redis (user-group cache)", f"{type(exc).__name__}: {exc}") from exc
        return members

    async def groups_of(self, user_id: str) -> frozenset[str]:
        """The configured user groups ``user_id`` belongs to (only groups the policy names are asked)."""
        found = set()
        for group in sorted(self._groups):
            if user_id in await self._members(group):
                found.add(group)
        return frozenset(found)

    async def close(self) -> None:
        await self._redis.aclose()
