"""`kind: http` actions (issue 10) — seed 004's "retry a failed mobile-money payout", written as
configuration: `POST /v1/admin/mobile-money/payouts/{transaction_id}/retry` on the platform's admin
API, here a local server that records what it receives (tests/admin_api.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
import yaml

from bot.cli import main as opsbot_main
from bot.config import Config
from bot.domain import OpsRequest
from tests.actions_support import config_with_actions, example_with_actions
from tests.admin_api import AdminApi
from tests.conftest import ALICE, CAROL, DAN
from tests.harness import Harness

TOKEN = "pay0ut-adm1n-7f3kq9zr"  # ADMIN_TOKEN: sent as `Authorization: Bearer …`, never shown or stored
BATCH = "8F2C1E4A-3B5D-4C6E-9F70-1A2B3C4D5E6F"  # typed in upper case: the body carries the canonical form
ACTIONS = """
retry-payout:
  kind: http
  summary: Retry a failed mobile-money payout
  words: retry payout
  environment: production
  params:
    # Any printable ASCII, on purpose: what keeps `/`, `..` and `%2F` out of the path is the http
    # kind's own check, not the pattern.
    transaction_id: {type: string, pattern: '[ -~]{1,64}', description: the payout's transaction id}
    channel: {type: enum, values: [mtn, moov]}
    amount: {type: int, min: 1, max: 500000}
    batch: {type: uuid}
  method: POST
  url: "${ADMIN_URL}/v1/admin/mobile-money/payouts/{transaction_id}/retry?channel={channel}"
  headers: {Authorization: "Bearer ${ADMIN_TOKEN}"}
  body: {transaction_id: "{transaction_id}", channel: "{channel}", amount: "{amount}", batch: "{batch}",
         requested_by: "{requester}", note: "opsbot {request_id}"}
  expect: [200, 202]
  timeout: 2
resend-receipt:
  kind: http
  summary: Resend a payout receipt that failed to send
  environment: production
  params:
    reference: {type: string, pattern: '[A-Z]{2}[0-9]{4,10}'}
  method: PUT
  url: "${ADMIN_URL}/v1/admin/receipts/{reference}/resend"
  headers: {Authorization: "Bearer ${ADMIN_TOKEN}"}
  plan:
    database: app
    query: "SELECT reference, status FROM payout_receipts WHERE reference = {reference}"
"""
RECEIPTS = """CREATE TABLE payout_receipts (reference text PRIMARY KEY, status text NOT NULL);
INSERT INTO payout_receipts VALUES ('PR123456', 'failed')"""
PATH = "/v1/admin/mobile-money/payouts/{}/retry?channel={}"


@pytest_asyncio.fixture
async def admin() -> AsyncIterator[AdminApi]:
    api = await AdminApi().start()
    yield api
    await api.stop()


@pytest.fixture
def config(platform_db: str, redis_url: str, queue_prefix: str, admin: AdminApi) -> Config:
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute(RECEIPTS)
    return config_with_actions(platform_db, redis_url, queue_prefix, ACTIONS,
                               env={"ADMIN_URL": admin.url, "ADMIN_TOKEN": TOKEN})


async def approved(bot: Harness, text: str, *states: str) -> str:
    """``text`` asked by Alice, approved by Carol; the request's id once it reached one of ``states``."""
    before = await bot.last_request()
    await bot.slash(ALICE, text)

    async def opened() -> OpsRequest | None:
        r = await bot.last_request()
        return r if r is not None and r.card_ts and (before is None or r.id != before.id) else None
    request = await bot.eventually(opened, what="a new request")
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, *states, timeout=20)
    return done.id


async def answer_to(bot: Harness, text: str) -> str:
    """What the person sees for ``text``: a refusal at parse time comes in the slash command's ack."""
    status, body = await bot.slash(ALICE, text)
    assert status == 200
    try:
        return str(json.loads(body).get("text", body))
    except ValueError:
        return body


def thread_text(bot: Harness, request_card: tuple[str, str]) -> str:
    return "\n".join(m.all_text() for m in bot.slack.thread(*request_card))


async def everything_said_and_stored(bot: Harness, request_id: str) -> str:
    """Every word opsbot sent to Slack (cards, threads, the audit channel, answers), its audit rows and
    the stored request: where a header value must never appear."""
    request = await bot.runtime.store.get(request_id)
    assert request is not None
    return json.dumps([bot.slack.calls, bot.slack.responses, await bot.runtime.audit.log.rows(), request.plan,
                       request.result, request.error], default=str)


# ---------------------------------------------------------------------------------------------- success


async def test_retry_payout_sends_one_post_and_reports_the_answer(bot: Harness, admin: AdminApi) -> None:
    admin.answer(202, {"status": "queued", "payout": "TX:42@mm+1"})
    await bot.slash(ALICE, f"/ops retry payout TX:42@mm+1 MTN 5000 {BATCH}")
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert f"POST {admin.url}{PATH.format('TX%3A42%40mm%2B1', 'mtn')}" in card
    assert "Authorization (not shown)" in card and TOKEN not in card
    assert "Idempotency-Key: opsbot-&lt;derived from this plan&gt;" in card
    assert '"amount":5000' in card and '"batch":"8f2c1e4a-3b5d-4c6e-9f70-1a2b3c4d5e6f"' in card
    assert "expects status 200 or 202 within 2 s" in card
    assert admin.requests == []  # planning sends nothing

    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "unknown", "stale")
    assert done.state.value == "succeeded", done.error
    [seen] = admin.requests
    assert seen.method == "POST"
    assert seen.raw_path == PATH.format("TX%3A42%40mm%2B1", "mtn")
    assert seen.headers["idempotency-key"] == f"opsbot-{request.plan['fingerprint'][:32]}"
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {"transaction_id": "TX:42@mm+1", "channel": "mtn", "amount": 5000,
                           "batch": "8f2c1e4a-3b5d-4c6e-9f70-1a2b3c4d5e6f", "requested_by": ALICE, "note": f"opsbot {request.id}"}
    thread = thread_text(bot, (done.card_channel or "", done.card_ts or ""))
    assert "answered 202 Accepted to POST" in thread and "queued" in thread
    assert (done.result or {})["status"] == 202
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "succeeded"]
    assert TOKEN not in await everything_said_and_stored(bot, request.id)


async def test_the_header_secret_is_scrubbed_even_when_the_api_echoes_it(bot: Harness, admin: AdminApi) -> None:
    admin.answer(200, {"status": "queued", "debug": f"auth was {TOKEN}"})
    request_id = await approved(bot, f"/ops retry payout TX42 mtn 10 {BATCH}", "succeeded", "failed", "unknown")
    done = await bot.runtime.store.get(request_id)
    assert done is not None and done.state.value == "succeeded", done and done.error
    assert len(admin.requests) == 1
    thread = thread_text(bot, (done.card_channel or "", done.card_ts or ""))
    assert "auth was" in thread and TOKEN not in thread
    assert TOKEN not in await everything_said_and_stored(bot, request_id)


# ---------------------------------------------------------------------------------------------- the API says no, or nothing


@pytest.mark.parametrize(("status", "body", "words"), [
    (409, {"error": "payout TX42 is already being retried"}, "409 Conflict"),
    (422, "upstream wallet provider refused the amount", "422 Unprocessable"),
])
async def test_an_unexpected_status_fails_with_the_excerpt(bot: Harness, admin: AdminApi, status: int, body: object,
                                                          words: str) -> None:
    admin.answer(status, body, content_type="application/json" if isinstance(body, dict) else "text/plain")
    request_id = await approved(bot, f"/ops retry payout TX42 mtn 10 {BATCH}", "succeeded", "failed", "unknown")
    done = await bot.runtime.store.get(request_id)
    assert done is not None and done.state.value == "failed"
    assert len(admin.requests) == 1  # sent once, not retried
    error = done.error or ""
    assert words in error and ("already being retried" if status == 409 else "refused the amount") in error
    assert "opsbot changed nothing beyond that one call" in error
    if status == 409:
        assert "conflict" in error
    assert "Failed:" in thread_text(bot, (done.card_channel or "", done.card_ts or ""))


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_a_5xx_is_an_unknown_outcome_and_a_repeat_sends_the_same_key(bot: Harness, admin: AdminApi, status: int) -> None:
    # A gateway's 502/504 says nothing about whether the API behind it paid: a human looks, and if they
    # ask again on an unchanged target, the API sees the same Idempotency-Key and does not pay twice.
    admin.answer(status, "upstream wallet provider timeout", content_type="text/plain")
    first = await approved(bot, f"/ops retry payout TX42 mtn 10 {BATCH}", "succeeded", "failed", "unknown")
    done = await bot.runtime.store.get(first)
    assert done is not None and done.state.value == "unknown", done and done.error
    assert "does not say whether the API" in (done.error or "") and "wallet provider timeout" in (done.error or "")
    admin.answer(200, {"status": "already done"})
    second = await approved(bot, f"/ops retry payout TX42 mtn 10 {BATCH}", "succeeded", "failed", "unknown")
    assert second != first
    keys = [r.headers["idempotency-key"] for r in admin.requests]
    assert len(keys) == 2 and keys[0] == keys[1], "the same request on an unchanged target carries the same key"
    third = await approved(bot, f"/ops retry payout TX42 mtn 11 {BATCH}", "succeeded", "failed", "unknown")
    assert third not in (first, second) and admin.requests[-1].headers["idempotency-key"] != keys[0]  # another amount


async def test_a_hanging_api_is_an_unknown_outcome_sent_once(bot: Harness, admin: AdminApi) -> None:
    admin.hang()
    request_id = await approved(bot, f"/ops retry payout TX42 mtn 10 {BATCH}", "succeeded", "failed", "unknown")
    done = await bot.runtime.store.get(request_id)
    assert done is not None and done.state.value == "unknown", done and done.error
    assert "no answer within 2 s" in (done.error or "") and "may have been acted on" in (done.error or "")
    await asyncio.sleep(0.5)
    assert len(admin.requests) == 1
    assert await bot.audit_events(request_id) == ["requested", "approval_given", "approved", "started", "unknown"]


async def test_an_api_that_is_down_fails_with_nothing_sent(bot: Harness, admin: AdminApi) -> None:
    await bot.slash(ALICE, f"/ops retry payout TX42 mtn 10 {BATCH}")
    request = await bot.requested()
    await admin.down()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "unknown")
    assert done.state.value == "failed"
    assert "cannot connect" in (done.error or "") and "nothing was sent" in (done.error or "")
    assert admin.requests == []


# ---------------------------------------------------------------------------------------------- hostile values


@pytest.mark.parametrize(("args", "says"), [
    ("../etc mtn 10 {b}", "`transaction_id`: `../etc` holds `/`"),
    (".. mtn 10 {b}", "`transaction_id`: `..` is `..`, which names another path"),
    ("a%2Fb mtn 10 {b}", "`transaction_id`: `a%2Fb` holds `%`"),
    ("a/b mtn 10 {b}", "holds `/`"),
    ("a\\\\b mtn 10 {b}", "`a\\b` holds `\\`"),  # typed `a\\b`: the grammar reads `a\b`
    ("TX42?x=1 mtn 10 {b}", "holds `?`"),
    ("TX42#frag mtn 10 {b}", "holds `#`"),
    ("ТХ42 mtn 10 {b}", "U+0422 CYRILLIC CAPITAL LETTER TE"),  # Cyrillic Т and Х
    ("TX42 mтn 10 {b}", "is not one of `mtn`, `moov`"),  # Cyrillic т in an enum
    ("TX42 mtn ５０００ {b}", "Type `5000`"),  # fullwidth digits for an int
    ("TX42 mtn 10 8f2c1e4a-3b5d-4c6e-9f70-1а2b3c4d5e6f", "is not a UUID"),  # Cyrillic а in a uuid
    ("TX42 mtn 0 {b}", "outside 1–500000"),
])
async def test_hostile_values_are_refused_and_nothing_is_asked(bot: Harness, admin: AdminApi, args: str, says: str) -> None:
    reply = await answer_to(bot, "/ops retry payout " + args.format(b=BATCH))
    assert says in reply
    assert "Usage: `/ops retry payout <transaction_id> <channel> <amount> <batch>`" in reply
    assert await bot.last_request() is None
    assert admin.requests == []
    assert not [m for m in bot.slack.in_channel(Harness.INCIDENT) if m.buttons()]


@pytest.mark.parametrize(("text", "says"), [
    ("""/ops resend receipt "'; DROP TABLE x;--" """, "`reference`: `'; DROP TABLE x;--` is not text matching"),
    ("/ops resend receipt PR12\x003456", "U+0000"),  # the Slack edge refuses control characters anywhere
    ("/ops resend receipt PR" + "1" * 200_000, "characters long"),
])
async def test_sql_meta_characters_nul_and_huge_values_are_refused(bot: Harness, admin: AdminApi, platform_db: str,
                                                                   text: str, says: str) -> None:
    reply = await answer_to(bot, text)
    assert says in reply
    assert "retype" in reply or "Usage:" in reply or "Shorten" in reply
    assert await bot.last_request() is None
    assert admin.requests == []
    with psycopg.connect(platform_db) as conn:
        assert conn.execute("SELECT reference, status FROM payout_receipts").fetchall() == [("PR123456", "failed")]


# ---------------------------------------------------------------------------------------------- races and staleness


async def test_two_fast_approvals_send_one_request(bot: Harness, admin: AdminApi) -> None:
    await bot.slash(ALICE, f"/ops retry payout TX42 mtn 10 {BATCH}")
    request = await bot.requested()
    await asyncio.gather(bot.click(CAROL, request.id), bot.click(DAN, request.id))
    done = await bot.state_of(request.id, "succeeded", "failed", "unknown")
    assert done.state.value == "succeeded", done.error
    await asyncio.sleep(1.0)  # a second run, if any, would have sent by now
    assert len(admin.requests) == 1
    assert (await bot.audit_events(request.id)).count("started") == 1


async def test_a_plan_row_that_changes_makes_it_stale_and_nothing_is_sent(bot: Harness, admin: AdminApi,
                                                                          platform_db: str) -> None:
    await bot.slash(ALICE, "/ops resend receipt PR123456")
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert "now: reference=PR123456, status=failed" in card
    assert f"PUT {admin.url}/v1/admin/receipts/PR123456/resend" in card
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute("UPDATE payout_receipts SET status = 'sent'")
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale", "unknown")
    assert done.state.value == "stale", done.error
    assert admin.requests == []


async def test_a_plan_row_that_did_not_change_sends_the_put(bot: Harness, admin: AdminApi) -> None:
    admin.answer(204)
    request_id = await approved(bot, "/ops resend receipt PR123456", "succeeded", "failed", "stale", "unknown")
    done = await bot.runtime.store.get(request_id)
    assert done is not None and done.state.value == "succeeded", done and done.error
    [seen] = admin.requests
    assert (seen.method, seen.raw_path, seen.body) == ("PUT", "/v1/admin/receipts/PR123456/resend", b"")
    assert "content-type" not in seen.headers  # no body, no content type
    assert "answered 204 No Content to PUT: '(empty body)'" in (done.result or {}).get("message", "").replace("`", "'")


async def test_no_plan_row_is_refused_before_anything_is_asked(bot: Harness, admin: AdminApi) -> None:
    await bot.slash(ALICE, "/ops resend receipt PR999999")
    reply = await bot.response(containing="nothing matches")
    assert "the plan query found no row" in reply["text"]
    assert await bot.last_request() is None and admin.requests == []


async def test_the_plan_database_down_refuses(bot: Harness, admin: AdminApi, platform_db: str) -> None:
    config = bot.runtime.pipeline.ctx.config
    broken = config.databases["app"].model_copy(update={"url": "postgresql://nobody@127.0.0.1:1/none"})
    object.__setattr__(config, "databases", {**config.databases, "app": broken})
    await bot.slash(ALICE, "/ops resend receipt PR123456")
    reply = await bot.response(containing="unavailable")
    assert "database `app`" in reply["text"]
    assert await bot.last_request() is None and admin.requests == []


# ---------------------------------------------------------------------------------------------- dry run and policy check


async def test_dry_run_shows_the_plan_and_sends_nothing(bot: Harness, admin: AdminApi) -> None:
    await bot.slash(ALICE, f"/ops retry payout TX42 mtn 10 {BATCH} --dry-run")
    reply = await bot.response(containing="Dry run")
    text = reply["text"]
    assert f"POST {admin.url}{PATH.format('TX42', 'mtn')}" in text
    assert "Authorization (not shown)" in text and TOKEN not in text
    assert "policy:" in text
    assert admin.requests == []
    assert await bot.last_request() is None


def nepxy_file(tmp_path: Path) -> Path:
    """The example with these actions and a rule for them, as a file (for the `opsbot policy` commands)."""
    raw = example_with_actions(ACTIONS)
    raw["rules"].append({"name": "payouts", "commands": ["retry-payout", "resend-receipt"], "allow": ["engineer"],
                         "approval": {"from": ["approver"], "count": 1, "expires": "15m"}})
    path = tmp_path / "nepxy.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_policy_check_accepts_http_actions_without_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"NOVA_DATABASE_URL": "postgresql://nova@db/nova", "NOVA_REDIS_URL": "redis://redis:6379/0",
                        "ADMIN_URL": "https://admin.nepxy.internal", "ADMIN_TOKEN": TOKEN}.items():
        monkeypatch.setenv(name, value)
    code = opsbot_main(["policy", "check", "--config", str(nepxy_file(tmp_path))])
    out = capsys.readouterr()
    assert code == 0, out
    assert "warning" not in out.out + out.err and ": OK (" in out.out
    assert TOKEN not in out.out + out.err


def test_policy_explain_plans_an_http_action_and_sends_nothing(tmp_path: Path, admin: AdminApi, platform_db: str,
                                                                redis_url: str) -> None:
    env = {**os.environ, "NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url, "ADMIN_URL": admin.url,
           "ADMIN_TOKEN": TOKEN}
    proc = subprocess.run([sys.executable, "-m", "bot", "policy", "explain", "--config", str(nepxy_file(tmp_path)), "--as",
                           ALICE, f"/ops retry payout TX42 mtn 10 {BATCH}"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plan:     retry payout TX42 mtn 10 8f2c1e4a-3b5d-4c6e-9f70-1a2b3c4d5e6f: Retry a failed mobile-money payout" in proc.stdout
    assert "decision: NEEDS APPROVAL — 1 approval from approver" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    assert admin.requests == []
