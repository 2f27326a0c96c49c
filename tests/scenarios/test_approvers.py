"""Approvers who get told (issue 14): the card names who may approve; nobody acting gets them a
direct message, later an escalation; Cancel, Request again, Deny with a reason (a dialog); break-glass
reviews reminded until acknowledged; `/ops pending` links the cards.

Everything goes through signed Slack requests; time is moved forward by giving the reminders sweep
a ``now`` (the pattern of ``Reverts.run_due(now)``). Two replicas are two sweepers with their own
worker id on the same database.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from bot.config import Config, parse_config
from bot.domain import OpsRequest
from bot.errors import ConfigError
from bot.pipeline import Admission
from bot.reminders import Reminders
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.slack_api import FakeSlack
from bot.slack.approvers import NO_DIALOG
from tests.conftest import ALICE, BOTH, CAROL, DAN, EVE
from tests.harness import Harness

GRACE, HEIDI = "U0GRACE", "U0HEIDI"  # in the approvers' and the leads' Slack user groups
APPROVERS = {CAROL, DAN, BOTH, GRACE}

POLICY = """
slack: {audit_channel: C0AUDIT}
roles:
  engineer: {users: [U0ALICE, U0BOTH]}
  approver: {users: [U0CAROL, U0DAN, U0BOTH], usergroups: [S0APPROVE]}
  lead: {users: [U0EVE], usergroups: [S0LEADS]}
environments:
  production: {kube_context: nova-prod}
deployments:
  worker: {environment: production, namespace: nova, name: nova-worker, replicas: {min: 1, max: 20}}
rules:
  - {name: read-only, commands: [status], allow: [engineer, approver, lead]}
  - name: production-changes
    commands: [scale]
    allow: [engineer]
    break_glass: [engineer]
    approval: {from: [approver], count: 1, expires: 45m, remind_after: 10m, escalate_after: 30m, escalate_to: [lead]}
"""


@pytest.fixture
def config() -> Config:
    return parse_config(POLICY, env={})


@pytest.fixture(autouse=True)
def usergroups(slack: FakeSlack) -> None:
    slack.usergroups = {"S0APPROVE": [GRACE, CAROL], "S0LEADS": [HEIDI]}


def later(minutes: float) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def dms(bot: Harness, user: str) -> list[str]:
    return [m.text for m in bot.slack.in_channel(user)]


def card_text(bot: Harness, request: OpsRequest) -> str:
    return next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == request.card_ts).all_text()


async def rows(bot: Harness, event: str) -> list[dict[str, Any]]:
    return [r for r in await bot.runtime.audit.log.rows() if r["event"] == event]


async def press(bot: Harness, user: str, request: OpsRequest, action_id: str, *, value: str | None = None,
                card_ts: str | None = None) -> tuple[int, str]:
    """A click on any of the card's buttons, as Slack posts it."""
    ts = card_ts or request.card_ts
    payload = {
        "type": "block_actions", "team": {"id": "T0FAKE", "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0FAKE"},
        "api_app_id": "A0OPS", "token": "legacy", "trigger_id": uuid.uuid4().hex,
        "container": {"type": "message", "message_ts": ts, "channel_id": Harness.INCIDENT, "is_ephemeral": False},
        "channel": {"id": Harness.INCIDENT, "name": "incident"}, "message": {"ts": ts, "text": "card"},
        "response_url": bot.slack.response_url("click-" + uuid.uuid4().hex),
        "actions": [{"action_id": action_id, "block_id": f"x:{request.id}", "value": request.id if value is None else value,
                     "type": "button", "action_ts": str(time.time())}],
    }
    return await bot.post_signed(urlencode({"payload": json.dumps(payload)}))


async def open_request(bot: Harness, user: str = ALICE, text: str = "/ops scale worker 5") -> OpsRequest:
    await bot.slash(user, text)
    return await bot.requested()


async def deny_dialog(bot: Harness, user: str, request: OpsRequest) -> dict[str, Any]:
    before = len(bot.slack.views)
    await press(bot, user, request, "opsbot_deny")
    return await bot.eventually(lambda: _async(bot.slack.views[before] if len(bot.slack.views) > before else None),
                                what="the Deny dialog to open")


async def _async(value: Any) -> Any:
    return value


async def submit(bot: Harness, view: dict[str, Any], user: str, reason: str, *, private_metadata: str | None = None) -> tuple[int, str]:
    return await bot.post_signed(bot.slack.view_submission_body(view["id"], user, {"reason": reason},
                                                                private_metadata=private_metadata))


# ---------------------------------------------------------------------------- who is named, who is told


async def test_the_card_names_the_eligible_approvers_never_the_requester(bot: Harness) -> None:
    request = await open_request(bot, BOTH)  # BOTH is an engineer and an approver
    text = card_text(bot, request)
    line = next(line for line in text.splitlines() if line.startswith("approvals from approver"))
    assert "<!subteam^S0APPROVE>" in line and f"<@{CAROL}>" in line and f"<@{DAN}>" in line
    assert f"<@{BOTH}>" not in line, "the requester is never named as an approver"
    assert request.approvers_named == ("S0APPROVE", CAROL, DAN)
    assert (request.remind_after, request.escalate_after, request.escalate_to) == (600, 1800, ("lead",))


async def test_nobody_acted_reminds_each_approver_then_escalates_and_the_lead_may_approve(
        bot: Harness, kube: KubeApiServer) -> None:
    request = await open_request(bot)
    sweep = bot.runtime.approvals.reminders
    assert await sweep.run_due(later(5)) == 0  # not due yet
    assert all(not dms(bot, u) for u in APPROVERS)
    assert await sweep.run_due(later(11)) == 1
    for user in APPROVERS:  # the user group's members included (GRACE), each once (CAROL is in the group too)
        [dm] = dms(bot, user)
        assert request.id in dm and "nova-worker" in dm
        assert f"<https://fake.slack/archives/{Harness.INCIDENT}/p{request.card_ts.replace('.', '')}|Open the card>" in dm
    assert not dms(bot, ALICE), "the requester is not reminded of their own request"
    [reminded] = await rows(bot, "reminded")
    assert sorted(reminded["result"]["told"]) == sorted(APPROVERS) and reminded["request_id"] == request.id
    assert await sweep.run_due(later(20)) == 0, "a reminder is sent once"

    # Escalation: the leads are told, the card and thread say so, and a lead's approval now counts.
    assert await sweep.run_due(later(31)) == 1
    assert len(dms(bot, EVE)) == 1 and len(dms(bot, HEIDI)) == 1 and "Escalated to you (lead)" in dms(bot, EVE)[0]
    assert all(len(dms(bot, u)) == 1 for u in APPROVERS), "the approvers are not told again by the escalation"
    [escalated] = await rows(bot, "escalated")
    assert sorted(escalated["result"]["told"]) == [EVE, HEIDI] and escalated["result"]["roles"] == ["lead"]
    fresh = await bot.runtime.store.get(request.id)
    assert fresh is not None and fresh.approver_roles == ("approver", "lead") and fresh.escalated_at is not None
    await bot.eventually(lambda: _async("escalated to lead" in card_text(bot, request)), what="the card to say it escalated")
    assert "<@U0EVE>" in card_text(bot, request) and "<!subteam^S0LEADS>" in card_text(bot, request)
    await bot.click(EVE, request.id)
    await bot.state_of(request.id, "succeeded")
    assert int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"]) == 5


async def test_an_approval_before_the_reminder_means_nobody_is_told(bot: Harness) -> None:
    request = await open_request(bot)
    await bot.click(CAROL, request.id)
    await bot.state_of(request.id, "succeeded")
    assert await bot.runtime.approvals.reminders.run_due(later(40)) == 2  # remind and escalate rows, both closed
    assert all(not dms(bot, u) for u in [*APPROVERS, EVE, HEIDI])
    assert not await rows(bot, "reminded") and not await rows(bot, "escalated")


async def test_two_replicas_sweeping_at_once_tell_each_approver_exactly_once(
        bot: Harness, config: Config, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str, queue_prefix: str) -> None:
    requests = [await open_request(bot, ALICE, f"/ops scale worker {n}") for n in (4, 5, 6)]
    # A second replica: its own runtime (pools, Slack client, user-group directory) on the same database and Redis.
    other = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                                queue_prefix=queue_prefix, with_worker=False)
    try:
        one, two = bot.runtime.approvals.reminders, other.runtime.approvals.reminders
        assert one.worker_id != two.worker_id
        claimed = await asyncio.gather(one.run_due(later(11)), two.run_due(later(11)), two.run_due(later(11)))
    finally:
        await other.stop()
    assert sum(claimed) == 3
    for user in APPROVERS:
        got = dms(bot, user)
        assert len(got) == 3 and all(sum(req.id in m for m in got) == 1 for req in requests), got
    assert len(await rows(bot, "reminded")) == 3


async def test_a_round_slower_than_the_lease_tells_each_approver_once(bot: Harness) -> None:
    """Replica one claims the row and is slow (Slack answering slowly, a long batch); past the lease
    replica two takes it again and tells everyone. Replica one, when it gets to it, finds the row no
    longer its own: it sends nothing and writes no audit row."""
    request = await open_request(bot)
    one = bot.runtime.approvals.reminders
    two = Reminders(config=one.config, store=one.store, chat=one.chat, audit=one.audit, directory=one.directory,
                    notices=one.notices, permalinks=one.permalinks)
    gate = asyncio.Event()
    real = one._one

    async def slow(row: dict[str, Any], now: datetime | None) -> None:
        await gate.wait()
        await real(row, now)
    one._one = slow  # type: ignore[method-assign]
    first = asyncio.create_task(one.run_due(later(11)))
    await asyncio.sleep(0.5)
    assert await two.run_due(later(14)) == 1  # the lease (2 min) has passed: replica two takes it
    gate.set()
    assert await first == 1
    for user in APPROVERS:
        assert len([m for m in dms(bot, user) if request.id in m]) == 1, (user, dms(bot, user))
    assert [sorted(r["result"]["told"]) for r in await rows(bot, "reminded")] == [sorted(APPROVERS)]


async def test_a_round_taken_over_mid_way_stops_and_the_other_tells_only_the_rest(bot: Harness, state_db: str) -> None:
    """Replica one is slow after its first message; replica two takes the row past the lease and
    tells the others; replica one then stops rather than messaging anyone again."""
    request = await open_request(bot)
    one = bot.runtime.approvals.reminders
    two = Reminders(config=one.config, store=one.store, chat=one.chat, audit=one.audit, directory=one.directory,
                    notices=one.notices, permalinks=one.permalinks)
    gate, sent = asyncio.Event(), asyncio.Event()
    real_told = one._told

    async def slow_told(row: dict[str, Any], user: str) -> bool:
        ok = await real_told(row, user)
        sent.set()
        await gate.wait()
        return ok
    one._told = slow_told  # type: ignore[method-assign]
    first = asyncio.create_task(one.run_due(later(11)))
    await asyncio.wait_for(sent.wait(), 10)
    assert await two.run_due(later(14)) == 1
    gate.set()
    await first
    for user in APPROVERS:
        assert len([m for m in dms(bot, user) if request.id in m]) == 1, (user, dms(bot, user))
    assert len(await rows(bot, "reminded")) == 1
    with psycopg.connect(state_db, autocommit=True) as conn:
        row = conn.execute("SELECT told, outcome FROM approval_reminders WHERE request_id = %s AND kind = 'remind'",
                           (request.id,)).fetchone()
    assert row is not None and sorted(row[0]) == sorted(APPROVERS) and row[1] == "sent"


async def test_slack_down_at_reminder_time_is_retried_later_not_lost_nor_doubled(bot: Harness) -> None:
    request = await open_request(bot)
    sweep = bot.runtime.approvals.reminders
    bot.slack.down = True
    assert await sweep.run_due(later(11)) == 1
    bot.slack.down = False
    assert all(not dms(bot, u) for u in APPROVERS) and not await rows(bot, "reminded")
    assert await sweep.run_due(later(11)) == 0, "retried after a back-off, not at once"
    # Half-way: Slack takes some messages, then fails; the retry sends only to the rest.
    sent: list[str] = []
    original = bot.runtime.chat.post_message

    async def flaky(*, channel_id: str, text: str, thread_ts: str | None = None) -> str:
        if sent:
            bot.slack.down = True
        sent.append(channel_id)
        return await original(channel_id=channel_id, text=text, thread_ts=thread_ts)

    bot.runtime.chat.post_message = flaky  # type: ignore[method-assign]
    try:
        assert await sweep.run_due(later(13)) == 1
    finally:
        bot.runtime.chat.post_message = original  # type: ignore[method-assign]
        bot.slack.down = False
    assert sum(len(dms(bot, u)) for u in APPROVERS) == 1
    assert await sweep.run_due(later(20)) == 1
    assert all(len(dms(bot, u)) == 1 for u in APPROVERS), "everyone told once in the end"
    [reminded] = await rows(bot, "reminded")
    assert sorted(reminded["result"]["told"]) == sorted(APPROVERS)
    assert request.id in dms(bot, CAROL)[0]


async def test_user_groups_unreadable_at_reminder_time_is_retried(bot: Harness, state_db: str) -> None:
    request = await open_request(bot)
    await bot.runtime.redis.client(bot.runtime.settings.redis_url).delete(
        *[k async for k in bot.runtime.redis.client(bot.runtime.settings.redis_url).scan_iter("opsbot:*usergroup:*")])
    bot.runtime.approvals.directory._local = None  # type: ignore[attr-defined]  # the in-process second of cache
    bot.slack.fail_methods["usergroups.users.list"] = "internal_error"
    sweep = bot.runtime.approvals.reminders
    assert await sweep.run_due(later(11)) == 1
    assert all(not dms(bot, u) for u in APPROVERS), "nobody is told on a guess of who is in the group"
    with psycopg.connect(state_db, autocommit=True) as conn:
        error = conn.execute("SELECT last_error FROM approval_reminders WHERE request_id = %s AND kind = 'remind'",
                             (request.id,)).fetchone()
    assert error and "usergroups.users.list" in error[0]
    del bot.slack.fail_methods["usergroups.users.list"]
    assert await sweep.run_due(later(15)) == 1
    assert all(len(dms(bot, u)) == 1 for u in APPROVERS)


async def test_redis_down_at_reminder_time_is_retried(bot: Harness, state_db: str) -> None:
    import redis.asyncio as aioredis

    request = await open_request(bot)
    directory = bot.runtime.approvals.directory
    real = directory._redis  # type: ignore[attr-defined]
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)  # nothing listens there: Redis is down
    directory._redis, directory._local = dead, None  # type: ignore[attr-defined]
    sweep = bot.runtime.approvals.reminders
    try:
        assert await sweep.run_due(later(11)) == 1
    finally:
        directory._redis = real  # type: ignore[attr-defined]
        await dead.aclose()
    assert all(not dms(bot, u) for u in APPROVERS) and not await rows(bot, "reminded")
    with psycopg.connect(state_db, autocommit=True) as conn:
        error = conn.execute("SELECT last_error FROM approval_reminders WHERE request_id = %s AND kind = 'remind'",
                             (request.id,)).fetchone()
    assert error and "Redis" in error[0]
    assert await sweep.run_due(later(15)) == 1
    assert all(len(dms(bot, u)) == 1 for u in APPROVERS)


# ---------------------------------------------------------------------------- Cancel and Request again


async def test_cancel_is_the_requesters_own(bot: Harness) -> None:
    request = await open_request(bot)
    await press(bot, CAROL, request, "opsbot_cancel")
    await bot.eventually(lambda: _async(any("only they can cancel" in m.text for m in bot.slack.ephemeral_to(CAROL))),
                         what="CAROL to be told only the requester can cancel")
    assert (await bot.runtime.store.get(request.id)).state.value == "pending_approval"  # type: ignore[union-attr]
    assert "cancel_refused" in await bot.audit_events(request.id)
    await press(bot, ALICE, request, "opsbot_cancel")
    await bot.state_of(request.id, "cancelled")
    await press(bot, ALICE, request, "opsbot_cancel", value="r-\x00forged")
    await bot.eventually(lambda: _async(any("does not name an opsbot request" in m.text for m in bot.slack.ephemeral_to(ALICE))),
                         what="a forged Cancel to be refused")


async def test_request_again_after_deny_and_after_expiry_replans_as_the_clicker(bot: Harness, state_db: str) -> None:
    request = await open_request(bot)
    view = await deny_dialog(bot, CAROL, request)
    await submit(bot, view, CAROL, "wrong deployment")
    await bot.state_of(request.id, "denied")
    await bot.eventually(lambda: _async("Request again" in json.dumps(
        next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == request.card_ts).blocks)), what="Request again")
    await press(bot, BOTH, request, "opsbot_request_again")
    again = await bot.eventually(lambda: _latest_other(bot, request.id), what="the request opened again")
    assert again.text == request.text and again.requester.user_id == BOTH and again.state.value == "pending_approval"
    await press(bot, BOTH, request, "opsbot_request_again")  # a second click: the same delivery, nothing new, and it says so
    told = await bot.eventually(lambda: _async(next((m for m in bot.slack.ephemeral_to(BOTH) if "already requested again" in m.text),
                                                    None)), what="the second click to be answered")
    assert f"`{again.id}`" in told.text and "its card" in told.text and "nothing new was requested" in told.text
    assert len([r for r in await rows(bot, "requested")]) == 2
    assert [(r["result"]["again_of"], r["result"]["opened"]) for r in await _rows_of(bot, "requested_again", 1)] == [
        (request.id, again.id)]
    refused = await rows(bot, "again_refused")
    assert [(r["actor_id"], r["request_id"], r["result"]["why"], r["result"]["again_as"]) for r in refused] == [
        (BOTH, request.id, "duplicate", again.id)]

    # Expired → Request again by the requester.
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE ops_requests SET expires_at = now() WHERE id = %s", (again.id,))
    await bot.state_of(again.id, "expired")
    await press(bot, ALICE, again, "opsbot_request_again")
    third = await bot.eventually(lambda: _latest_other(bot, request.id, again.id), what="the expired one opened again")
    assert third.requester.user_id == ALICE and third.text == request.text

    # Not with a forged id (a request that does not exist, or another request's id on this card).
    await press(bot, EVE, request, "opsbot_request_again", value="r-zzzz9999")
    await press(bot, EVE, request, "opsbot_request_again", value=third.id)
    await bot.eventually(lambda: _async(len([m for m in bot.slack.ephemeral_to(EVE) if "does not belong" in m.text]) == 2),
                         what="forged Request again clicks to be refused")
    # Not on a pending card; not when the text no longer reads as a command.
    await press(bot, ALICE, third, "opsbot_request_again")
    await bot.eventually(lambda: _async(any("only a denied, expired or stale" in m.text for m in bot.slack.ephemeral_to(ALICE))),
                         what="Request again on a pending card to be refused")
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE ops_requests SET command_text = 'frobnicate worker' WHERE id = %s", (request.id,))
    await press(bot, DAN, request, "opsbot_request_again")
    await bot.eventually(lambda: _async(any("no longer reads as a command" in m.text for m in bot.slack.ephemeral_to(DAN))),
                         what="a text that no longer parses to be refused")
    assert len(await rows(bot, "requested")) == 3


async def test_two_request_again_clicks_at_once_open_one_request_and_the_other_is_told(bot: Harness) -> None:
    request = await open_request(bot)
    await submit(bot, await deny_dialog(bot, CAROL, request), CAROL, "no")
    await bot.state_of(request.id, "denied")
    await asyncio.gather(*(press(bot, BOTH, request, "opsbot_request_again") for _ in range(3)))
    again = await bot.eventually(lambda: _latest_other(bot, request.id), what="the request opened again")
    await bot.eventually(lambda: _async(len(_told_already(bot, BOTH)) == 2 or None), what="the two other clicks to be answered")
    assert all(f"`{again.id}`" in m.text for m in _told_already(bot, BOTH))
    assert len(await rows(bot, "requested")) == 2
    assert len(await _rows_of(bot, "requested_again", 1)) == 1
    await asyncio.sleep(0.3)
    assert len(await rows(bot, "requested_again")) == 1
    assert [r["result"]["why"] for r in await rows(bot, "again_refused")] == ["duplicate", "duplicate"]


async def test_request_again_of_an_undo_that_no_longer_reads_shows_the_text_re_read(bot: Harness, state_db: str) -> None:
    """An undo card asked again re-reads `undo <original>`; when that is refused the message shows
    that text, not the undo's own command text. (The original's id is one the grammar no longer
    takes: a row from an older id format.)"""
    request = await open_request(bot)
    await submit(bot, await deny_dialog(bot, CAROL, request), CAROL, "no")
    await bot.state_of(request.id, "denied")
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE old AS SELECT * FROM ops_requests WHERE id = %s", (request.id,))
        conn.execute("UPDATE old SET id = 'r-OLD_1', delivery_id = NULL, card_channel = NULL, card_ts = NULL, state = 'failed'")
        conn.execute("INSERT INTO ops_requests SELECT * FROM old")
        conn.execute("UPDATE ops_requests SET undo_of = 'r-OLD_1' WHERE id = %s", (request.id,))
    await press(bot, BOTH, request, "opsbot_request_again")
    told = await bot.eventually(lambda: _async(next((m for m in bot.slack.ephemeral_to(BOTH) if "no longer reads" in m.text), None)),
                                what="the re-read text to be refused")
    assert "`/ops undo r-OLD_1`" in told.text and request.text not in told.text
    assert len(await rows(bot, "requested")) == 1 and not await rows(bot, "requested_again")


async def _rows_of(bot: Harness, event: str, n: int) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        got = await rows(bot, event)
        return got if len(got) >= n else None
    return await bot.eventually(probe, what=f"{n} {event} audit rows")


def _told_already(bot: Harness, user: str) -> list[Any]:
    return [m for m in bot.slack.ephemeral_to(user) if "already requested again" in m.text]


async def test_request_again_past_the_admission_bound_is_told_busy_and_audited_once(bot: Harness) -> None:
    request = await open_request(bot)
    await submit(bot, await deny_dialog(bot, CAROL, request), CAROL, "no")
    await bot.state_of(request.id, "denied")
    bot.runtime.pipeline.admission = admission = Admission(limit=2, max_wait=None)
    assert [admission.enter(), admission.enter()] == [None, None]  # two commands in flight
    await press(bot, BOTH, request, "opsbot_request_again")
    busy = await bot.eventually(lambda: _async(next((m for m in bot.slack.ephemeral_to(BOTH) if "opsbot is busy" in m.text), None)),
                                what="the click to be told opsbot is busy")
    assert "2 commands in flight" in busy.text
    await asyncio.sleep(0.3)
    refused = await rows(bot, "busy")
    assert [(r["actor_id"], r["command_text"], r["result"]["why"]) for r in refused] == [(BOTH, request.text, "admission")]
    assert len(await rows(bot, "requested")) == 1 and not await rows(bot, "requested_again")
    assert admission.in_flight == 2  # a refused click takes no place
    admission.leave()
    admission.leave()
    await press(bot, BOTH, request, "opsbot_request_again")  # room again: it is taken
    again = await bot.eventually(lambda: _latest_other(bot, request.id), what="the request opened again")
    assert again.requester.user_id == BOTH
    await bot.eventually(lambda: _async(admission.in_flight == 0 or None), what="the click to leave admission")
    assert [r["result"]["opened"] for r in await _rows_of(bot, "requested_again", 1)] == [again.id]


async def _latest_other(bot: Harness, *not_ids: str) -> OpsRequest | None:
    r = await bot.last_request()
    return r if r is not None and r.id not in not_ids and r.card_ts else None


# ---------------------------------------------------------------------------- Deny asks for a reason


async def test_deny_opens_a_dialog_and_the_reason_is_on_the_card_in_the_thread_and_audited(bot: Harness) -> None:
    request = await open_request(bot)
    view = await deny_dialog(bot, CAROL, request)
    assert view["view"]["callback_id"] == "opsbot_deny_reason"
    assert (await bot.runtime.store.get(request.id)).state.value == "pending_approval"  # type: ignore[union-attr]
    status, ack = await submit(bot, view, CAROL, "<!channel> not during the freeze, see <https://evil.example|INC-9>")
    assert status == 200 and "errors" not in ack
    denied = await bot.state_of(request.id, "denied")
    assert denied.deny_reason and denied.deny_reason.startswith("<!channel>")
    text = card_text(bot, request)
    await bot.eventually(lambda: _async("reason for denying" in card_text(bot, request)), what="the reason on the card")
    text = card_text(bot, request)
    assert "&lt;!channel&gt; not during the freeze" in text and "<!channel>" not in text and "<https://evil" not in text
    thread = [m.text for m in bot.slack.thread(Harness.INCIDENT, request.card_ts or "")]
    assert any("Reason: &lt;!channel&gt; not during the freeze" in t for t in thread)
    [row] = await rows(bot, "denied")
    assert row["result"]["reason"].startswith("<!channel> not during the freeze")


@pytest.mark.parametrize("reason, says", [
    ("ok\x00then", "U+0000 NULL"),
    ("fine\x1b[31m", "U+001B ESCAPE"),
    ("x" * 100_000, "at most 500"),
    ("   ", "is empty"),
])
async def test_a_hostile_reason_is_refused_in_the_dialog(bot: Harness, reason: str, says: str) -> None:
    request = await open_request(bot)
    view = await deny_dialog(bot, CAROL, request)
    status, ack = await submit(bot, view, CAROL, reason)
    assert status == 200
    answer = json.loads(ack)
    assert answer["response_action"] == "errors" and says in answer["errors"]["reason"]
    await asyncio.sleep(0.3)
    assert (await bot.runtime.store.get(request.id)).state.value == "pending_approval"  # type: ignore[union-attr]
    refused = [r for r in await rows(bot, "vote_refused") if r["result"].get("why") == "reason_refused"]
    assert len(refused) == 1 and "\x00" not in json.dumps(refused[0]["result"])


async def test_forged_and_foreign_dialogs_count_nothing(bot: Harness) -> None:
    first = await open_request(bot)
    second = await open_request(bot, ALICE, "/ops scale worker 7")
    view = await deny_dialog(bot, CAROL, first)
    # Someone else submits CAROL's dialog.
    status, ack = await submit(bot, view, DAN, "not mine")
    assert "opened by someone else" in json.loads(ack)["errors"]["reason"]
    # The metadata names another request (with the first one's card): the vote finds the card is not its own.
    meta = json.loads(view["view"]["private_metadata"])
    status, ack = await submit(bot, view, CAROL, "forged", private_metadata=json.dumps({**meta, "r": second.id}))
    assert status == 200 and "errors" not in ack
    await bot.eventually(lambda: _async(any("does not belong" in m.text for m in bot.slack.ephemeral_to(CAROL))),
                         what="the forged deny to be refused")
    # Garbage metadata.
    status, ack = await submit(bot, view, CAROL, "forged", private_metadata="{\"r\": \"'; DROP TABLE\"}")
    assert "does not name an opsbot request" in json.loads(ack)["errors"]["reason"]
    for r in (first, second):
        assert (await bot.runtime.store.get(r.id)).state.value == "pending_approval"  # type: ignore[union-attr]
    # A request closed meanwhile: approved by DAN, then CAROL's dialog comes back.
    await bot.click(DAN, first.id)
    await bot.state_of(first.id, "succeeded")
    await submit(bot, view, CAROL, "too late")
    await bot.eventually(lambda: _async(any("already" in m.text for m in bot.slack.ephemeral_to(CAROL))),
                         what="the late deny to be refused")
    assert (await bot.runtime.store.get(first.id)).state.value == "succeeded"  # type: ignore[union-attr]


async def test_two_approvers_denying_at_once_count_one_deny(bot: Harness) -> None:
    request = await open_request(bot)
    carol = await deny_dialog(bot, CAROL, request)
    dan = await deny_dialog(bot, DAN, request)
    await asyncio.gather(submit(bot, carol, CAROL, "first"), submit(bot, dan, DAN, "second"))
    denied = await bot.state_of(request.id, "denied")
    assert denied.deny_reason in ("first", "second")
    await bot.eventually(lambda: _async(len([r for r in bot.slack.ephemeral_to(CAROL) + bot.slack.ephemeral_to(DAN)
                                             if "already denied" in r.text]) == 1), what="the second deny to be told")
    assert len(await rows(bot, "denied")) == 1


async def test_deny_counts_without_a_reason_when_the_dialog_cannot_be_opened(bot: Harness) -> None:
    request = await open_request(bot)
    bot.slack.fail_methods["views.open"] = "expired_trigger_id"
    await press(bot, CAROL, request, "opsbot_deny")
    denied = await bot.state_of(request.id, "denied")
    assert denied.deny_reason == NO_DIALOG
    [row] = await rows(bot, "denied")
    assert row["result"]["reason"] == NO_DIALOG


async def test_the_requester_and_outsiders_get_no_dialog(bot: Harness) -> None:
    request = await open_request(bot)
    await press(bot, ALICE, request, "opsbot_deny")  # the requester
    await press(bot, EVE, request, "opsbot_deny")  # a lead, before any escalation
    await bot.eventually(lambda: _async(len([r for r in bot.slack.ephemeral_to(EVE) if "approvals must come from" in r.text]) == 1),
                         what="EVE to be told she may not deny")
    await bot.eventually(lambda: _async(any("your own request" in m.text for m in bot.slack.ephemeral_to(ALICE))),
                         what="ALICE to be told")
    assert not bot.slack.views


# ---------------------------------------------------------------------------- break-glass reviews


async def test_an_unacknowledged_break_glass_review_is_reminded_with_backoff_until_acknowledged(bot: Harness) -> None:
    await bot.slash(ALICE, '/ops scale worker 6 --break-glass "INC-9 checkout down"')
    request = await bot.requested()
    await bot.state_of(request.id, "succeeded")
    sweep = bot.runtime.approvals.reminders
    assert await sweep.run_due(later(11)) == 1
    assert all(len(dms(bot, u)) == 1 and "still needs a review" in dms(bot, u)[0] for u in APPROVERS)
    assert await sweep.run_due(later(25)) == 0, "the next reminder comes after a longer gap (20 min)"
    assert await sweep.run_due(later(32)) == 1
    assert all(len(dms(bot, u)) == 2 for u in APPROVERS)
    assert [r["result"]["round"] for r in await rows(bot, "review_reminded")] == [1, 2]
    await bot.click(CAROL, request.id, "acknowledge")
    await bot.eventually(lambda: _reviewed(bot, request.id), what="the review")
    assert await sweep.run_due(later(24 * 60)) == 1  # claimed, found acknowledged, ended
    assert await sweep.run_due(later(48 * 60)) == 0
    assert all(len(dms(bot, u)) == 2 for u in APPROVERS)


async def _reviewed(bot: Harness, request_id: str) -> bool:
    r = await bot.runtime.store.get(request_id)
    return bool(r and r.review_state == "acknowledged")


async def test_review_reminders_are_bounded(bot: Harness) -> None:
    await bot.slash(ALICE, '/ops scale worker 6 --break-glass "INC-9 checkout down"')
    request = await bot.requested()
    await bot.state_of(request.id, "succeeded")
    sweep = bot.runtime.approvals.reminders
    for day in range(1, 12):
        await sweep.run_due(later(day * 24 * 60))
    assert len(dms(bot, CAROL)) == 6 and len(await rows(bot, "review_reminded")) == 6


# ---------------------------------------------------------------------------- /ops pending


async def test_pending_links_each_card(bot: Harness) -> None:
    request = await open_request(bot)
    await bot.slash(CAROL, "/ops pending")
    reply = (await bot.response(containing=request.id))["text"]
    assert f"<https://fake.slack/archives/{Harness.INCIDENT}/p{(request.card_ts or '').replace('.', '')}|card>" in reply


# ---------------------------------------------------------------------------- the policy's fields


@pytest.mark.parametrize("approval, says", [
    ("{from: [approver], escalate_to: [lead]}", "escalate_to is set but escalate_after is not"),
    ("{from: [approver], escalate_after: 5m, remind_after: 10m, escalate_to: [lead]}", "must be later than remind_after"),
    ("{from: [approver], escalate_after: 20m, escalate_to: [lead]}", "must be shorter than expires"),
    ("{from: [approver], escalate_after: 12m}", "escalate_after is set but escalate_to is not"),
    ("{from: [approver], remind_after: 15m}", "remind_after (900 s) must be shorter than expires"),
    ("{from: [approver], remind_after: soon}", "is not a duration"),
    ("{from: [approver], escalate_after: 12m, escalate_to: [nobody]}", "role 'nobody' is not defined"),
])
def test_reminder_settings_are_checked(approval: str, says: str) -> None:
    text = POLICY.replace("{from: [approver], count: 1, expires: 45m, remind_after: 10m, escalate_after: 30m, escalate_to: [lead]}",
                          approval)
    with pytest.raises(ConfigError) as err:
        parse_config(text, env={}, source="p.yaml")
    assert says in str(err.value)


def test_defaults_remind_after_ten_minutes_and_never_escalate() -> None:
    text = POLICY.replace("{from: [approver], count: 1, expires: 45m, remind_after: 10m, escalate_after: 30m, escalate_to: [lead]}",
                          "{from: [approver]}")
    approval = parse_config(text, env={}).rules[1].approval
    assert approval is not None and (approval.remind_after, approval.escalate_after, approval.escalate_to) == (600, None, ())
    off = parse_config(text.replace("{from: [approver]}", "{from: [approver], remind_after: 0}"), env={}).rules[1].approval
    assert off is not None and off.remind_after == 0


# ---------------------------------------------------------------------------- the playground


async def test_the_playground_shows_the_deny_dialog_and_direct_messages(bot: Harness) -> None:
    import aiohttp

    from tests.harness import SIGNING_SECRET

    bot.slack.bot_events_url, bot.slack.signing_secret = bot.url + "/slack/events", SIGNING_SECRET
    request = await open_request(bot)
    base = f"http://127.0.0.1:{bot.slack.port}/playground"
    async with aiohttp.ClientSession() as http:
        await http.post(f"{base}/action", json={"user": CAROL, "channel": Harness.INCIDENT, "message_ts": request.card_ts,
                                                "action_id": "opsbot_deny", "value": request.id})

        async def personal(user: str) -> dict[str, Any]:
            async with http.get(f"{base}/personal", params={"user": user}) as r:
                return dict(await r.json())

        shown = await bot.eventually(lambda: _views(personal(CAROL)), what="CAROL's dialog in the playground")
        assert shown["views"][0]["view"]["title"]["text"] == "Deny request"
        assert (await personal(DAN))["views"] == [], "the dialog is CAROL's alone"
        async with http.post(f"{base}/view", json={"view_id": shown["views"][0]["id"], "user": CAROL,
                                                   "values": {"reason": "bad\x00reason"}}) as r:
            assert "U+0000 NULL" in (await r.json())["errors"]["reason"]
        assert (await personal(CAROL))["views"], "an error keeps the dialog open"
        async with http.post(f"{base}/view", json={"view_id": shown["views"][0]["id"], "user": CAROL,
                                                   "values": {"reason": "not now"}}) as r:
            assert (await r.json())["errors"] == {}
        denied = await bot.state_of(request.id, "denied")
        assert denied.deny_reason == "not now" and (await personal(CAROL))["views"] == []
        # A reminder lands in the person's direct messages.
        second = await open_request(bot, ALICE, "/ops scale worker 8")
        await bot.runtime.approvals.reminders.run_due(later(11))
        assert any(second.id in m["text"] for m in (await personal(DAN))["dms"])


async def _views(pending: Any) -> dict[str, Any] | None:
    got = await pending
    return got if got["views"] else None


def test_policy_check_warns_when_the_escalation_role_has_no_members() -> None:
    from bot.config import config_warnings

    empty = parse_config(POLICY.replace("lead: {users: [U0EVE], usergroups: [S0LEADS]}", "lead: {}"), env={})
    assert any("escalates to 'lead', which has no members" in w for w in config_warnings(empty))
    assert not any("escalates to" in w for w in config_warnings(parse_config(POLICY, env={})))
