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

Not every failure is an outage. When Slack answers that a group does not exist (``no_such_subteam``),
that the app lacks the ``usergroups:read`` scope (``missing_scope``) or that the workspace's plan has
no user groups (``plan_upgrade_required``), asking again will not help: the configuration is wrong.
Such a group is taken as having no members (it grants nothing; roles from other groups and from
user ids still work), the answer is cached like a membership, ``problems()`` says which groups and
why (for the person refused, see ``bot.messages.usergroup_problems``), and it is logged once per
process and counted (``on_config_error``). Slack unreachable, a 5xx or ``ratelimited`` stays an
outage: ``BackendUnavailable``, refused, "try again when it is back".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bot.adapters.redis_pools import redis_errors
from bot.errors import BackendUnavailable

log = logging.getLogger(__name__)

FetchMembers = Callable[[str], Awaitable[list[str]]]
Memberships = dict[str, frozenset[str]]

# Slack's answers to usergroups.users.list that mean "the configuration is wrong", not "Slack is down"
# (docs.slack.dev/reference/methods/usergroups.users.list: no_such_subteam is the method's own error
# for an unknown group id; missing_scope and plan_upgrade_required apply to every group at once).
UNKNOWN_GROUP = "no_such_subteam"
MISSING_SCOPE = "missing_scope"
NO_USER_GROUPS = "plan_upgrade_required"
CONFIG_ERRORS = frozenset({UNKNOWN_GROUP, MISSING_SCOPE, NO_USER_GROUPS})
_WHOLE_APP = frozenset({MISSING_SCOPE, NO_USER_GROUPS})  # the same answer for every group: asked once


def slack_error(exc: BaseException) -> str | None:
    """The ``error`` of a Web API call that Slack answered (HTTP 200, ``ok: false``), else None.
    Duck-typed on slack_sdk's ``SlackApiError`` (``.response.status_code``, ``.response.data``)."""
    response = getattr(exc, "response", None)
    data = getattr(response, "data", None)
    if getattr(response, "status_code", None) != 200 or not isinstance(data, dict):
        return None
    error = data.get("error")
    return str(error) if error else None


def config_error(exc: BaseException) -> str | None:
    """``slack_error(exc)`` when it is one of ``CONFIG_ERRORS``: asking again will not help."""
    error = slack_error(exc)
    return error if error in CONFIG_ERRORS else None


def _failure(exc: BaseException) -> str:
    """A short reason for an outage (not slack_sdk's multi-line message)."""
    error = slack_error(exc)
    if error:
        return error
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return f"HTTP {status}" + (" (rate-limited)" if status == 429 else "")
    return str(exc) or type(exc).__name__


def slack_fetch(client: Any) -> FetchMembers:
    """``usergroups.users.list`` through a slack_sdk ``AsyncWebClient``: the members of one group."""
    async def members(group: str) -> list[str]:
        resp = await client.usergroups_users_list(usergroup=group)
        return [str(u) for u in resp.get("users") or []]

    return members


async def check_groups(fetch: FetchMembers, groups: frozenset[str]) -> dict[str, str]:
    """For `opsbot policy check`: ask Slack about each group once (no cache), and return the ones it
    says the configuration is wrong about (group → ``no_such_subteam``, ``missing_scope`` …). Raises
    ``BackendUnavailable`` when Slack cannot answer (unreachable, 5xx, ratelimited, invalid_auth)."""
    problems: dict[str, str] = {}
    for group in sorted(groups):
        try:
            await fetch(group)
        except Exception as exc:
            error = config_error(exc)
            if error is None:
                raise BackendUnavailable("Slack", f"usergroups.users.list({group}) failed: {_failure(exc)}") from exc
            if error in _WHOLE_APP:
                return dict.fromkeys(sorted(groups), error)
            problems[group] = error
    return problems


@dataclass(frozen=True)
class _Snapshot:
    memberships: Memberships
    problems: dict[str, str] = field(default_factory=dict)  # group → the config error Slack answered


class UserGroupDirectory:
    def __init__(self, redis: aioredis.Redis, fetch: FetchMembers, *, ttl: int, groups: frozenset[str], prefix: str = "opsbot",
                 local_ttl: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 on_config_error: Callable[[str, str], None] = lambda group, error: None) -> None:
        self._redis, self._fetch, self._ttl, self._prefix = redis, fetch, max(1, ttl), prefix
        self._groups = sorted(groups)
        self._local_ttl, self._clock = local_ttl, clock
        self._on_config_error = on_config_error
        self._local: _Snapshot | None = None
        self._local_until = float("-inf")
        self._lookup: asyncio.Future[_Snapshot] | None = None
        self._reported: set[tuple[str, str]] = set()  # (group, error) already logged by this process
        self._problems: dict[str, str] = {}

    def _key(self, group: str) -> str:
        return f"{self._prefix}:usergroup:{group}"

    async def groups_of(self, user_id: str) -> frozenset[str]:
        """The configured user groups ``user_id`` belongs to (only groups the policy names are asked)."""
        snapshot = await self._memberships()
        self._problems = snapshot.problems
        return frozenset(g for g, members in snapshot.memberships.items() if user_id in members)

    async def members_of(self, groups: frozenset[str]) -> frozenset[str]:
        """Everyone in any of ``groups`` (configured groups only; the same cache as ``groups_of``),
        for the reminders sweep: who to tell."""
        snapshot = await self._memberships()
        return frozenset(u for g in groups for u in snapshot.memberships.get(g, ()))

    def problems(self) -> dict[str, str]:
        """The configured groups that grant nothing because of the configuration (group → Slack's
        error: ``no_such_subteam``, ``missing_scope``, ``plan_upgrade_required``), as of the last
        ``groups_of``."""
        return dict(self._problems)

    async def _memberships(self) -> _Snapshot:
        if self._local is not None and self._clock() < self._local_until:
            return self._local
        if self._lookup is None:
            lookup = self._lookup = asyncio.ensure_future(self._load())
            lookup.add_done_callback(self._lookup_done)
        # shield: a caller that gives up (its request cancelled) does not cancel the others' lookup.
        return await asyncio.shield(self._lookup)

    def _lookup_done(self, lookup: asyncio.Future[_Snapshot]) -> None:
        if self._lookup is lookup:
            self._lookup = None
        if not lookup.cancelled():
            lookup.exception()  # retrieved here too, in case every caller gave up waiting

    def _config_error(self, group: str, error: str) -> None:
        """Slack said the configuration is wrong about ``group``: counted each time Slack says so
        (at most once per group per cache period), logged once per process."""
        self._on_config_error(group, error)
        if (group, error) not in self._reported:
            self._reported.add((group, error))
            log.error("Slack user group %s grants no roles: usergroups.users.list answered %s (a configuration error, "
                      "reported once)", group, error)

    async def _load(self) -> _Snapshot:
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
        problems: dict[str, str] = {}
        missing: list[str] = []
        for group, value, ttl_ms in zip(self._groups, values, ttls_ms, strict=True):
            if value is None:
                missing.append(group)
                continue
            cached: Any = json.loads(value)
            if isinstance(cached, dict):  # {"error": …}: Slack said the configuration is wrong about it
                memberships[group], problems[group] = frozenset(), str(cached.get("error"))
            else:
                memberships[group] = frozenset(cached)
            if ttl_ms >= 0:
                until = min(until, now + ttl_ms / 1000)
            elif ttl_ms == -2:  # expired between the MGET and the PTTL: good for this call only
                until = now
        fetched: dict[str, list[str] | dict[str, str]] = {}
        whole_app: str | None = None  # missing_scope or plan_upgrade_required: the same for every group
        try:
            for group in missing:  # one at a time, in order: Slack rate-limits usergroups.users.list
                if whole_app:
                    fetched[group] = {"error": whole_app}
                    self._config_error(group, whole_app)
                    continue
                try:
                    fetched[group] = await self._fetch(group)
                except Exception as exc:
                    error = config_error(exc)
                    if error is None:
                        raise BackendUnavailable("Slack user groups", f"usergroups.users.list({group}) failed: {_failure(exc)}") from exc
                    fetched[group] = {"error": error}
                    self._config_error(group, error)
                    if error in _WHOLE_APP:
                        whole_app = error
        finally:
            if fetched:  # what Slack did answer is cached even when a later group failed
                async with redis_errors("Redis (user-group cache)"):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for group, members in fetched.items():
                            pipe.set(self._key(group), json.dumps(members), ex=self._ttl)
                        await pipe.execute()
        for group, answer in fetched.items():
            if isinstance(answer, dict):
                memberships[group], problems[group] = frozenset(), answer["error"]
            else:
                memberships[group] = frozenset(answer)
        snapshot = _Snapshot(memberships, problems)
        self._local, self._local_until = snapshot, until
        return snapshot
