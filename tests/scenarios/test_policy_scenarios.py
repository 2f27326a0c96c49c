"""Policy and approvals through signed HTTP, with real approvers clicking: N-of-M, each-of,
break-glass and its review, user groups (and their failure), channel allowlist, frozen
environments, rate limits, open-request limits, pending and cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from bot.config import Config, parse_config
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, CAROL, DAN, EVE, MALLORY
from tests.harness import Harness

LEAD, IC, GROUPIE = "U0LEAD", "U0IC", "U0GROUPIE"

POLICY = """
slack: {audit_channel: C0AUDIT, allowed_channels: [C0INCIDENT], usergroup_cache: 1s}
roles:
  engineer: {users: [U0ALICE], usergroups: [S0ONCALL]}
  approver: {users: [U0CAROL, U0DAN], usergroups: [S0APPROVERS]}
  lead: {users: [U0LEAD]}
  incident-commander: {users: [U0IC]}
  auditor: {users: [U0EVE]}
environments:
  production: {kube_context: nova-prod}
  production-eu: {kube_context: nova-prod, frozen: "EU freeze until the audit closes"}
deployments:
  worker: {environment: production, namespace: nova, name: nova-worker, replicas: {min: 1, max: 20}}
  api: {environment: production, namespace: nova, name: nova-api, replicas: {min: 1, max: 12}}
  eu-worker: {environment: production-eu, namespace: nova, name: nova-worker}
limits:
  max_open_requests_per_user: 2
  rate: [{commands: [rollback], per_user: 2, window: 1h}]
rules:
  - {name: read-only, commands: [status], allow: [engineer, approver, auditor]}
  - name: production-changes
    commands: [scale, rollback]
    allow: [engineer]
    approval: {from: [approver], count: 1}
    break_glass: [incident-commander]
  - name: big-scale
    commands: [scale]
    when: {replicas_above: 10}
    approval: {from: [approver, lead], count: 2, each_of: [lead]}
"""


@pytest.fixture
def config() -> Config:
    return parse_config(POLICY, env={})


@pytest.fixture(autouse=True)
def usergroups(slack: FakeSlack) -> None:
    slack.usergroups = {"S0ONCALL": [GROUPIE], "S0APPROVERS": ["U0GRPAPPROVER"]}


@pytest_asyncio.fixture
async def groups_bot(bot: Harness) -> AsyncIterator[Harness]:
    yield bot


def replicas(kube: KubeApiServer) -> int:
    return int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"])


async def test_two_of_m_with_one_from_lead(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 12")
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert "approvals 0/2" in card and "lead" in card
    await bot.click(CAROL, request.id)
    await bot.click(DAN, request.id)
    # Two approvers, but none is a lead: still waiting, and the thread says why.
    thread = await bot.eventually(lambda: _thread_with(bot, request.card_ts, "one from each of lead"), what="a notice")
    assert thread
    assert (await bot.runtime.store.get(request.id)).state.value == "pending_approval"  # type: ignore[union-attr]
    assert replicas(kube) == 3
    await bot.click(LEAD, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded" and replicas(kube) == 12
    approvals = [(a.approver.user_id, a.roles) for a in done.approvals]
    assert approvals == [(CAROL, ("approver",)), (DAN, ("approver",)), (LEAD, ("lead",))]


async def test_frozen_environment_refuses_changes_but_not_reads(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale eu-worker 5")
    reply = await bot.response(containing="Not allowed")
    assert "production-eu is frozen: EU freeze until the audit closes" in reply["text"]
    await bot.slash(ALICE, "/ops status eu-worker")
    assert "replicas: 3 desired" in (await bot.response(containing="nova-worker in nova"))["text"]


async def test_commands_only_from_allowed_channels(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale worker 5", channel="C0RANDOM")
    reply = await bot.response(containing="Not allowed")
    assert "opsbot takes commands only in <#C0INCIDENT>" in reply["text"]
    await bot.slash(ALICE, "/ops help", channel="C0RANDOM")
    assert "/ops scale" in (await bot.response(containing="opsbot commands"))["text"]


async def test_break_glass_runs_now_and_is_reviewed_after(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, '/ops scale worker 6 --break-glass "no approver awake"')
    reply = await bot.response(containing="Not allowed")
    assert "may not break glass" in reply["text"]
    await bot.slash(IC, '/ops scale worker 6 --break-glass "INC-9 checkout down, no approver awake"')
    request = await bot.requested()
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded" and replicas(kube) == 6
    assert done.review_state == "needed"
    audit = [m.text for m in bot.slack.in_channel("C0AUDIT") if request.id in m.text]
    assert any("BREAK-GLASS" in t for t in audit)
    card = next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == done.card_ts)
    assert [b["text"]["text"] for b in card.buttons()] == ["Undo", "Acknowledge (review)"]
    # The break-glass user cannot review their own run; an approver can.
    await bot.click(IC, request.id, "acknowledge")
    await bot.eventually(lambda: _ephemeral(bot, IC, "cannot review your own request"), what="the refusal")
    await bot.click(CAROL, request.id, "acknowledge")

    async def reviewed():  # type: ignore[no-untyped-def]
        r = await bot.runtime.store.get(request.id)
        return r if r and r.review_state == "acknowledged" else None

    r = await bot.eventually(reviewed, what="the review")
    assert r.reviewed_by == CAROL

    async def story():  # type: ignore[no-untyped-def]
        events = await bot.audit_events(request.id)
        return events if events[-1:] == ["break_glass_reviewed"] else None

    assert await bot.eventually(story, what="the review's audit row") == [
        "requested", "break_glass", "started", "succeeded", "followed", "review_refused", "break_glass_reviewed"]


async def test_break_glass_does_not_skip_a_stricter_rule_without_it(bot: Harness, kube: KubeApiServer) -> None:
    """3 → 15 matches production-changes (break_glass: incident-commander) and big-scale (2 approvals,
    one from a lead, no break_glass): the stricter rule is not skipped, nothing runs."""
    await bot.slash(IC, '/ops scale worker 15 --break-glass "INC-10 traffic spike"')
    reply = await bot.response(containing="Not allowed")
    assert "big-scale does not allow break-glass for your roles (incident-commander)" in reply["text"]
    assert "ask for approval instead" in reply["text"]
    assert await bot.audit_events() == ["policy_denied"]
    await asyncio.sleep(0.5)
    assert replicas(kube) == 3


async def test_roles_from_user_groups(groups_bot: Harness, kube: KubeApiServer) -> None:
    bot = groups_bot
    await bot.slash(GROUPIE, "/ops scale worker 4")
    request = await bot.requested()
    await bot.click("U0GRPAPPROVER", request.id)
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded" and replicas(kube) == 4
    assert [c["usergroup"] for c in bot.slack.calls_to("usergroups.users.list")] == ["S0APPROVERS", "S0ONCALL"]


async def test_user_group_lookup_failure_fails_closed(groups_bot: Harness, kube: KubeApiServer) -> None:
    bot = groups_bot
    await bot.slash(ALICE, "/ops scale worker 4")
    request = await bot.requested()
    await asyncio.sleep(1.1)  # the membership cache (1 s here) runs out
    bot.slack.fail_methods["usergroups.users.list"] = "ratelimited"
    await bot.click(CAROL, request.id)  # Carol is an approver by user id, but groups cannot be checked
    msg = await bot.eventually(lambda: _ephemeral(bot, CAROL, "not counted"), what="a refusal")
    assert "Slack user groups is unavailable" in msg
    assert (await bot.runtime.store.get(request.id)).state.value == "pending_approval"  # type: ignore[union-attr]
    await bot.slash(GROUPIE, "/ops scale worker 5")
    reply = await bot.response(containing="Refused")
    assert "Slack user groups is unavailable" in reply["text"]
    bot.slack.fail_methods.clear()
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded" and replicas(kube) == 4


async def test_rate_limit_says_when_to_try_again(bot: Harness) -> None:
    previous = ""
    for _ in range(2):
        await bot.slash(ALICE, "/ops rollback api")
        request = await bot.eventually(lambda old=previous: _newer(bot, old), what="a new request")
        previous = request.id
        await bot.slash(ALICE, f"/ops cancel {request.id}")
        await bot.response(containing=f"Cancelled `{request.id}`")
    await bot.slash(ALICE, "/ops rollback api")
    reply = await bot.response(containing="rate limit")
    assert "at most 2 `rollback` requests per 3600 s per person. Try again in" in reply["text"]
    assert "policy_denied" in await bot.audit_events()


async def test_open_request_limit_and_cancel(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale worker 4")
    first = await bot.requested()
    await bot.slash(ALICE, "/ops rollback api")
    second = await bot.eventually(lambda: _newer(bot, first.id), what="the second request")
    await bot.slash(ALICE, "/ops scale worker 5")
    reply = await bot.response(containing="open request")
    assert f"you already have 2 open requests (`{first.id}`, `{second.id}`); the limit is 2" in reply["text"]
    # Only the requester can cancel; then the card says so.
    await bot.slash(CAROL, f"/ops cancel {first.id}")
    refused = (await bot.response(containing="only they"))["text"]
    assert "only they can cancel it" in refused and refused.startswith(":x: ")
    await bot.slash(ALICE, "/ops cancel nope")
    assert (await bot.response(containing="no request `nope`"))["text"].startswith(":x: ")
    await bot.slash(ALICE, f"/ops cancel {first.id}")
    await bot.response(containing=f"Cancelled `{first.id}`")
    done = await bot.state_of(first.id, "cancelled")
    assert done.state.value == "cancelled"
    await bot.click(CAROL, first.id)
    assert "already cancelled" in (await bot.eventually(lambda: _ephemeral(bot, CAROL, "already"), what="a notice"))


async def test_pending_lists_what_you_may_approve(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale worker 4")
    request = await bot.requested()
    await bot.slash(CAROL, "/ops pending")
    reply = await bot.response(containing="you may approve")
    assert request.id in reply["text"] and "nova-worker: 3 → 4 replicas" in reply["text"]
    await bot.slash(ALICE, "/ops pending")  # the requester: their own request is not theirs to approve
    assert "No open requests" in (await bot.response(containing="No open requests"))["text"]
    await bot.slash(EVE, "/ops pending")
    assert "No open requests" in (await bot.response(containing="No open requests"))["text"]


async def test_help_for_one_command(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops help rollback")
    reply = await bot.response(containing="/ops rollback <deployment>")
    assert "You may run it; needs 1 approval from approver." in reply["text"] and "`--to-revision …`" in reply["text"]
    await bot.slash(MALLORY, "/ops help scale")
    reply = await bot.response(containing="/ops scale <deployment>")
    assert "You may not run it" in reply["text"]


def _actor(user: str):  # type: ignore[no-untyped-def]
    from bot.domain import Actor, UserId

    return Actor(UserId(user))


async def _ephemeral(bot: Harness, user: str, text: str) -> str | None:
    return next((m.text for m in bot.slack.ephemeral_to(user) if text in m.text), None)


async def _thread_with(bot: Harness, ts: str | None, text: str) -> list[str] | None:
    found = [m.text for m in bot.slack.thread(Harness.INCIDENT, ts or "") if text in m.text]
    return found or None


async def _ephemeral(bot: Harness, user: str, text: str) -> str | None:
    found = [m.text for m in bot.slack.ephemeral_to(user) if text in m.text]
    return found[-1] if found else None


async def _newer(bot: Harness, old_id: str):  # type: ignore[no-untyped-def]
    r = await bot.last_request()
    return r if r is not None and r.id != old_id and r.card_ts else None
