"""Runbook: "Update Provider table isActive: false to force routing to backup providers" (seed 000)."""

from __future__ import annotations

import psycopg

from tests.conftest import ALICE, CAROL
from tests.harness import Harness


def active(platform_db: str, name: str) -> bool:
    with psycopg.connect(platform_db) as conn:
        r = conn.execute('SELECT "isActive" FROM "Provider" WHERE name = %s', (name,)).fetchone()
    assert r is not None
    return bool(r[0])


async def test_disable_then_enable_a_provider(bot: Harness, platform_db: str) -> None:
    await bot.slash(ALICE, "/ops disable provider twilio")
    request = await bot.requested()
    assert "isActive true → false" in bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert active(platform_db, "twilio") is False
    assert active(platform_db, "vonage") is True
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "succeeded"]

    await bot.slash(ALICE, "/ops enable provider twilio")
    again = await bot.eventually(lambda: _newer(bot, request.id), what="a second request")
    await bot.click(CAROL, again.id)
    done = await bot.state_of(again.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert active(platform_db, "twilio") is True


async def test_unknown_provider_lists_the_known_ones(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops disable provider twillio")
    reply = await bot.response(containing="unknown provider")
    assert "Known providers: plivo, twilio, vonage." in reply["text"]


async def test_disabling_a_disabled_provider_is_a_clear_no_op(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops disable provider plivo")
    reply = await bot.response(containing="already disabled")
    assert "nothing to do" in reply["text"]


async def test_stale_when_the_row_changes_after_approval_was_asked(bot: Harness, platform_db: str) -> None:
    await bot.slash(ALICE, "/ops disable provider vonage")
    request = await bot.requested()
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute('UPDATE "Provider" SET "isActive" = false WHERE name = %s', ("vonage",))
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert "already disabled" in (done.error or "")


async def _newer(bot: Harness, old_id: str):  # type: ignore[no-untyped-def]
    r = await bot.last_request()
    return r if r is not None and r.id != old_id and r.card_ts else None


async def test_schema_qualified_table(bot: Harness, platform_db: str) -> None:
    # NepXy keeps its tables in schema `app` (seed 004): `schema:` names it, quoted like any identifier.
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA app; CREATE TABLE app.payout_providers (code text PRIMARY KEY, enabled boolean NOT NULL);'
                     "INSERT INTO app.payout_providers VALUES ('tmoney', true), ('flooz', true)")
    config = bot.runtime.pipeline.ctx.config
    spec = config.providers.model_copy(update={"schema_": "app", "table": "payout_providers", "key": "code",  # type: ignore[union-attr]
                                               "active_column": "enabled"})
    object.__setattr__(config, "providers", spec)
    await bot.slash(ALICE, "/ops disable provider flooz")
    request = await bot.requested()
    assert "enabled true → false" in bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    with psycopg.connect(platform_db) as conn:
        rows = conn.execute("SELECT code, enabled FROM app.payout_providers ORDER BY code").fetchall()
    assert rows == [("flooz", False), ("tmoney", True)]
