"""`kind: flag` in parts: the value word's checks, stored-value matching, the scheduled_reverts
statements in real PostgreSQL under racing replicas, the Redis compare-and-set against real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from bot.action_config import FlagAction
from bot.adapters.redis_pools import RedisPools
from bot.adapters.redis_targets import RedisTargetAdapter
from bot.adapters.store import Store
from bot.config import Config
from bot.domain import Actor, RequestState, UserId
from bot.errors import BackendUnavailable, UsageError
from commands.actions.flag import FlagCommand, duration_text, minutes_text, same
from commands.actions.make import make_command
from tests.actions_support import config_with_actions
from tests.faults.proxy import TcpProxy

SPEC = FlagAction.model_validate({"kind": "flag", "summary": "m", "database": "app", "table": "feature_flags",
                                  "value_column": "enabled", "key": "{name}",
                                  "params": {"name": {"type": "enum", "values": ["checkout", "search"]}},
                                  "values": {"on": True, "off": False}, "revert_after": "30m"})


def flag_command() -> FlagCommand:
    cmd = make_command("feature", SPEC)
    assert isinstance(cmd, FlagCommand)
    return cmd


def parse(*args: str) -> dict[str, Any]:
    return flag_command().parse(list(args), {}, None)  # type: ignore[arg-type]  # a flag's parse reads no config


def test_the_value_word_is_any_case_and_the_key_names_the_param() -> None:
    assert parse("checkout", "ON") == {"name": "checkout", "value": "on"}
    cmd = flag_command()
    assert cmd.usage == "/ops feature <name> <on|off>"
    assert cmd.target_key({"name": "search", "value": "off"}) == "flag/db/app/feature_flags/search"


@pytest.mark.parametrize(("value", "said"), [
    ("оn", "U+043E CYRILLIC SMALL LETTER O"),
    ("ｏｆｆ", "FULLWIDTH LATIN SMALL LETTER O"),
    ("true", "type one of `on`, `off`"),
    ("on\x07", "\\x07"),
    ("o" * 5000, "(5,000 characters)"),
    ("on;--", "is not a value of feature"),
])
def test_a_wrong_value_word_says_what_to_type(value: str, said: str) -> None:
    with pytest.raises(UsageError) as err:
        parse("checkout", value)
    assert said in str(err.value) and "/ops feature <name> <on|off>" in str(err.value)
    assert len(str(err.value)) < 600


def test_a_wrong_param_is_refused_before_the_value() -> None:
    with pytest.raises(UsageError, match="is not one of `checkout`, `search`"):
        parse("../checkout", "on")


def test_stored_values_match_by_type_not_by_python_equality() -> None:
    assert same(True, True) and not same(True, 1) and not same(1, "1") and not same(False, None)
    cmd = flag_command()
    assert cmd.word_of(False) == "off" and cmd.word_of(0) == "`0`" and cmd.word_of(None) == "`None`"


def test_durations_read_like_the_config() -> None:
    assert [duration_text(s) for s in (60, 1800, 5400, 90000, 7 * 86400)] == ["1m", "30m", "1h 30m", "1d 1h", "7d"]
    assert [minutes_text(s) for s in (10, 60, 299.6)] == ["1 minute", "1 minute", "5 minutes"]


# ---------------------------------------------------------------------------------------------- scheduled_reverts


@pytest_asyncio.fixture
async def store(state_db: str) -> AsyncIterator[Store]:
    s = Store(state_db, max_size=20)
    await s.open()
    yield s
    await s.close()


async def _request(store: Store, target: str = "flag/db/app/feature_flags/maintenance") -> str:
    r = await store.create_request(id="r-" + uuid.uuid4().hex[:8], command="maintenance", text="maintenance on",
                                   requester=Actor(UserId("U_A"), "alice"), channel_id="C",
                                   plan={"target": target, "environment": "p", "fingerprint": "f", "before": {"value": False},
                                         "after": {"value": True}},
                                   reason="", state=RequestState.SUCCEEDED, approvals_required=1, approver_roles=("approver",),
                                   rule="r", expires_in=60)
    return r.id


async def test_a_due_revert_is_claimed_by_one_of_ten_racing_replicas(store: Store) -> None:
    rid = await _request(store)
    now = datetime.now(UTC)
    await store.schedule_revert(rid, due_at=now + timedelta(minutes=30), announce_at=now + timedelta(minutes=25))
    await store.schedule_revert(rid, due_at=now, announce_at=now)  # a second schedule of one request is ignored
    assert await store.claim_due_reverts("w0", lease=timedelta(minutes=5)) == []  # not due
    assert await store.reverts_to_announce() == []
    later = now + timedelta(minutes=26)
    announced = await asyncio.gather(*(store.reverts_to_announce(later) for _ in range(10)))
    assert [len(a) for a in announced].count(1) == 1 and sum(len(a) for a in announced) == 1
    assert 230 < next(a for a in announced if a)[0]["seconds_left"] <= 240
    due = now + timedelta(minutes=31)
    claims = await asyncio.gather(*(store.claim_due_reverts(f"w{i}", lease=timedelta(minutes=5), now=due) for i in range(10)))
    assert sum(len(c) for c in claims) == 1
    winner = next(c[0]["claimed_by"] for c in claims if c)
    assert not await store.revert_done(rid, "someone-else", "reverted")  # only the claimant ends it
    assert await store.revert_done(rid, winner, "reverted")
    assert await store.claim_due_reverts("w0", lease=timedelta(0), now=due + timedelta(hours=1)) == []


async def test_an_outage_unclaims_it_for_later_and_a_lost_claim_is_taken_again(store: Store) -> None:
    rid = await _request(store)
    now = datetime.now(UTC)
    await store.schedule_revert(rid, due_at=now - timedelta(seconds=1), announce_at=now)
    [row] = await store.claim_due_reverts("w1", lease=timedelta(minutes=5))
    assert row["warned_at"] is None and row["attempts"] == 1
    await store.revert_later(rid, "w1", "database `app` is unavailable", delay=60, warned=True)
    assert await store.claim_due_reverts("w2", lease=timedelta(minutes=5)) == []  # not before next_attempt_at
    [again] = await store.claim_due_reverts("w2", lease=timedelta(minutes=5), now=datetime.now(UTC) + timedelta(seconds=61))
    assert again["warned_at"] is not None and again["attempts"] == 2 and again["last_error"].startswith("database")
    # w2 is lost mid-revert: after the lease another replica takes it; before, nobody does.
    assert await store.claim_due_reverts("w3", lease=timedelta(minutes=5), now=datetime.now(UTC) + timedelta(minutes=2)) == []
    [taken] = await store.claim_due_reverts("w3", lease=timedelta(minutes=5), now=datetime.now(UTC) + timedelta(minutes=10))
    assert taken["claimed_by"] == "w3"


async def test_a_change_putting_back_the_old_value_ends_the_pending_revert(store: Store) -> None:
    rid, other = await _request(store), await _request(store, target="flag/db/app/feature_flags/checkout")
    now = datetime.now(UTC)
    for r in (rid, other):
        await store.schedule_revert(r, due_at=now + timedelta(minutes=30), announce_at=now)
    assert await store.supersede_reverts(target="flag/db/app/feature_flags/maintenance", value={"value": True}, by="r-x") == []
    ended = await store.supersede_reverts(target="flag/db/app/feature_flags/maintenance", value={"value": False}, by="r-x")
    assert ended == [rid]
    left = await store.claim_due_reverts("w", lease=timedelta(minutes=5), now=now + timedelta(hours=1))
    assert [r["request_id"] for r in left] == [other]


async def test_the_app_role_may_use_scheduled_reverts(pg_admin: str, state_db: str) -> None:
    role = "opsbot_rev_" + uuid.uuid4().hex[:6]
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    owner = Store(state_db, max_size=2)
    await owner.open()
    try:
        await owner.grant_app_role(role)
        rid = await _request(owner)
    finally:
        await owner.close()
    scheme, _, rest = state_db.partition("://")
    app = Store(f"{scheme}://{role}@{rest.partition('@')[2]}", max_size=2)
    await app.open()
    try:
        await app.schedule_revert(rid, due_at=datetime.now(UTC), announce_at=datetime.now(UTC))
        [row] = await app.claim_due_reverts("w", lease=timedelta(minutes=5))
        assert await app.revert_done(row["request_id"], "w", "reverted")
    finally:
        await app.close()


# ---------------------------------------------------------------------------------------------- Redis compare-and-set


@pytest_asyncio.fixture
async def redis_config(platform_db: str, redis_url: str, queue_prefix: str) -> Config:
    return config_with_actions(platform_db, redis_url, queue_prefix, "{}")


async def test_redis_compare_and_set(redis_config: Config, redis_url: str, queue_prefix: str) -> None:
    pools = RedisPools()
    adapter = RedisTargetAdapter(redis_config, pools)
    key = f"{queue_prefix}:mode"
    direct = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert await adapter.get_value("cache", key, budget=2) is None
        assert not await adapter.set_value_if("cache", key, value="on", expect="off", budget=2)  # it is not set, not off
        assert await adapter.set_value_if("cache", key, value="on", expect=None, budget=2)
        assert await direct.get(key) == "on"
        assert not await adapter.set_value_if("cache", key, value="off", expect=None, budget=2)
        assert await adapter.set_value_if("cache", key, value=None, expect="on", budget=2)  # back to not set
        assert await direct.exists(key) == 0
    finally:
        await direct.delete(key)
        await direct.aclose()
        await pools.close()


async def test_redis_down_is_unavailable_not_unknown(redis_config: Config, redis_url: str) -> None:
    proxy, via = await TcpProxy.for_url(redis_url)
    config = redis_config.model_copy(update={"redis": {"cache": redis_config.redis["cache"].model_copy(update={"url": via})}})
    pools = RedisPools()
    proxy.down()
    try:
        with pytest.raises(BackendUnavailable) as err:
            await RedisTargetAdapter(config, pools).set_value_if("cache", "k", value="on", expect=None, budget=2)
        assert type(err.value) is BackendUnavailable and "Redis `cache`" in str(err.value)
    finally:
        await pools.close()
        await proxy.stop()


class RetriedWrite(RedisTargetAdapter):
    """The real adapter, but every compare-and-set is sent twice, as a client retry after a dropped reply
    does: the first one writes (its answer is lost), the retry finds the value changed and says 0."""

    async def set_value_if(self, target: str, key: str, *, value: str | None, expect: str | None, budget: float) -> bool:
        await super().set_value_if(target, key, value=value, expect=expect, budget=budget)
        return await super().set_value_if(target, key, value=value, expect=expect, budget=budget)


async def test_a_write_whose_answer_was_lost_is_an_unknown_outcome_not_a_stale_one(redis_config: Config, redis_url: str,
                                                                                  queue_prefix: str) -> None:
    from bot.domain import Plan
    from bot.errors import OutcomeUnknown
    from bot.ports import Context

    spec = FlagAction.model_validate({"kind": "flag", "summary": "m", "redis": "cache", "key": f"{queue_prefix}:maint",
                                      "values": {"off": "0", "on": "1"}, "revert_after": "30m"})
    cmd = make_command("maint", spec)
    pools = RedisPools()
    direct = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await direct.set(f"{queue_prefix}:maint", "0")
        ctx = Context(config=redis_config, kube=None, databases=None, queues=None,  # type: ignore[arg-type]
                      redis=RetriedWrite(redis_config, pools), http=None)  # type: ignore[arg-type]
        plan: Plan = await cmd.plan({"value": "on"}, ctx)
        with pytest.raises(OutcomeUnknown, match="cannot tell whether its own write did it"):
            await cmd.execute(plan, ctx)
        assert await direct.get(f"{queue_prefix}:maint") == "1"  # it was set: "nothing was overwritten" would be a lie
    finally:
        await direct.delete(f"{queue_prefix}:maint")
        await direct.aclose()
        await pools.close()
