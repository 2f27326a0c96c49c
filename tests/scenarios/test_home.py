"""Runbook: "open opsbot's Home tab to see what waits for me" — the Home tab lists the viewer's
open requests, what they may approve (Approve counts through the same rules as on the card), and
the last actions in their channels; refreshed on each open (issue 14)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bot.config import Config
from bot.domain import OpsRequest
from bot.errors import BackendUnavailable
from bot.home import HOME_APPROVE, HOME_OPEN_CARD
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, CAROL, DAN, EVE, MALLORY
from tests.faults.proxy import TcpProxy
from tests.harness import Harness
from tests.scenarios.test_playground import BROWSER_BUDGET, browser_page, needs_browser, playground, shot

__all__ = ["playground"]  # the fixture, shared with the playground's own tests


def buttons(view: dict[str, Any]) -> list[dict[str, Any]]:
    out = [e for b in view["blocks"] if b.get("type") == "actions" for e in b["elements"]]
    return out + [b["accessory"] for b in view["blocks"] if b.get("accessory")]


def text_of(view: dict[str, Any]) -> str:
    parts = []
    for b in view["blocks"]:
        if isinstance(b.get("text"), dict):
            parts.append(b["text"]["text"])
        parts += [e.get("text", "") for e in b.get("elements", []) if e.get("type") == "mrkdwn"]
    return "\n".join(parts)


async def open_home(bot: Harness, user: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """Send ``app_home_opened`` as Slack does and wait for the view it publishes (a new one)."""
    before = bot.slack.home_views.get(user, {}).get("hash")
    status, _ = await bot.post_signed(bot.slack.home_opened_body(user), "application/json")
    assert status == 200

    async def published() -> dict[str, Any] | None:
        view = bot.slack.home_views.get(user)
        return view if view and view.get("hash") != before else None
    return await bot.eventually(published, timeout=timeout, what=f"{user}'s Home tab")


async def pending_scale(bot: Harness) -> OpsRequest:
    await bot.slash(ALICE, '/ops scale worker 6 --reason "INC-9"')
    return await bot.requested()


async def test_home_tab_for_requester_approver_and_someone_else(bot: Harness) -> None:
    request = await pending_scale(bot)
    bot.slack.members[Harness.INCIDENT] = [ALICE, CAROL]

    mine = await open_home(bot, ALICE)
    assert mine["type"] == "home"
    words = text_of(mine)
    assert "*Your open requests*" in words and f"`{request.id}`" in words and "pending approval" in words and "0/1 approvals" in words
    assert "Nothing is waiting for you." in words
    assert HOME_APPROVE not in [b["action_id"] for b in buttons(mine)], "nobody approves their own request"
    assert [b["text"]["text"] for b in buttons(mine)] == ["Open card"] and buttons(mine)[0]["url"].startswith("https://fake.slack/")
    assert "*requested*" in words and "<#C0INCIDENT>" in words, "the last actions in a channel Alice is in"

    approver = await open_home(bot, CAROL)
    words = text_of(approver)
    assert "*Waiting for your approval*" in words and f"`{request.id}`" in words and f"<@{ALICE}>" in words
    approve = [b for b in buttons(approver) if b["action_id"] == HOME_APPROVE]
    assert len(approve) == 1 and approve[0]["value"] == request.id
    assert [b["text"]["text"] for b in buttons(approver) if b["action_id"] == HOME_OPEN_CARD] == ["Open card (to deny)"]
    assert not [b for b in buttons(approver) if "deny" in b["action_id"]], "Deny stays on the card (it asks for a reason)"

    other = await open_home(bot, MALLORY)
    words = text_of(other)
    assert request.id not in words and not buttons(other)
    assert "Nothing is waiting for you." in words and "_Nothing yet._" in words, "Mallory is in no channel with actions"

    # Refreshed on each open: after the approval, Carol's tab no longer offers it, Alice's says approved or done.
    await bot.click(CAROL, request.id, "approve")
    await bot.state_of(request.id, "succeeded")
    assert request.id not in text_of(await open_home(bot, CAROL)).split("*Waiting for your approval*")[1].split("*Last actions")[0]
    assert "*succeeded*" in text_of(await open_home(bot, ALICE))
    async def all_recorded() -> list[dict[str, Any]] | None:  # recorded last, after the view is published
        rows = [r for r in await bot.runtime.audit.log.rows() if r["event"] == "read" and r["command_text"] == "(Home tab)"]
        return rows if len(rows) == 5 else None
    reads = await bot.eventually(all_recorded, what="each open to be recorded")
    assert reads[0]["result"]["home"]["open"] == [request.id], "each open is recorded as a read"
    assert all(not r["channel_id"] for r in reads)


async def test_approve_from_the_home_tab_counts_once_even_with_two_fast_clicks(bot: Harness) -> None:
    request = await pending_scale(bot)
    await open_home(bot, CAROL)
    body = bot.slack.home_click_body(CAROL, request.id)
    (s1, _), (s2, _) = await asyncio.gather(bot.post_signed(body), bot.post_signed(body))
    assert (s1, s2) == (200, 200)
    done = await bot.state_of(request.id, "succeeded")
    assert [a.approver.user_id for a in done.approvals] == [CAROL]
    events = await bot.audit_events(request.id)
    assert events.count("approval_given") == 1 and events.count("approved") == 1
    async def second_refused() -> list[dict[str, Any]] | None:
        return [r for r in await bot.runtime.audit.log.rows() if r["event"] == "vote_refused"] or None
    refused = await bot.eventually(second_refused, what="the second click to be refused")
    assert [r["result"]["why"] for r in refused] in (["duplicate"], ["closed"])

    async def told() -> str | None:
        words = text_of(bot.slack.home_views[CAROL])
        return words if "You approved" in words or "already" in words else None
    assert await bot.eventually(told, what="Carol's Home tab to say what her click did")


async def test_forged_home_clicks_are_refused_and_recorded(bot: Harness) -> None:
    request = await pending_scale(bot)
    carol_view = await open_home(bot, CAROL)
    await open_home(bot, DAN)
    forged = [
        bot.slack.home_click_body(DAN, request.id, view=carol_view),  # another person's Home tab
        bot.slack.home_click_body(CAROL, request.id, view={**carol_view, "type": "modal"}),  # not a Home tab
        bot.slack.home_click_body(CAROL, request.id, view={**carol_view, "id": "V99999999"}),  # a view opsbot did not publish
        bot.slack.home_click_body(EVE, request.id),  # never opened it
        bot.slack.home_click_body(CAROL, "r-../../x\u0000"),  # not a request id
    ]
    for body in forged:
        assert (await bot.post_signed(body))[0] == 200

    async def refusals() -> list[dict[str, Any]] | None:
        rows = [r for r in await bot.runtime.audit.log.rows() if r["event"] == "vote_refused"]
        return rows if len(rows) == len(forged) else None
    rows = await bot.eventually(refusals, what="every forged click to be recorded")
    assert [r["result"]["why"] for r in rows] == ["forged"] * len(forged)
    assert sorted(r["actor_id"] for r in rows) == sorted([DAN, CAROL, CAROL, EVE, CAROL])
    again = await bot.runtime.store.get(request.id)
    assert again is not None and again.state.value == "pending_approval" and again.approvals == ()

    async def dan_told() -> bool:
        return "not on the Home tab opsbot showed you" in text_of(bot.slack.home_views[DAN])
    await bot.eventually(dan_told, what="Dan's Home tab to say his click did not count")

    # A real Home tab of the requester, with a hand-made Approve: the eligibility rules still apply.
    await open_home(bot, ALICE)
    assert (await bot.post_signed(bot.slack.home_click_body(ALICE, request.id)))[0] == 200

    async def ineligible() -> dict[str, Any] | None:
        return next((r for r in await bot.runtime.audit.log.rows()
                     if r["event"] == "vote_refused" and r["result"]["why"] == "ineligible"), None)
    row = await bot.eventually(ineligible, what="the requester's own approval to be refused")
    assert row["actor_id"] == ALICE and row["request_id"] == request.id

    # Carol's own Home tab still works.
    assert (await bot.post_signed(bot.slack.home_click_body(CAROL, request.id)))[0] == 200
    await bot.state_of(request.id, "succeeded")


async def test_hostile_home_events_publish_nothing(bot: Harness) -> None:
    for event in ({"user": "U0ALICE\u0000", "tab": "home"}, {"user": ALICE, "tab": "messages"}, {"user": "<@U0ALICE>", "tab": "home"}):
        body = json.loads(bot.slack.home_opened_body(ALICE))
        body["event"].update(event)
        assert (await bot.post_signed(json.dumps(body), "application/json"))[0] == 200
    await open_home(bot, CAROL)  # processed after them: they had their chance
    assert set(bot.slack.home_views) == {CAROL}


async def test_slack_refusing_the_member_list_says_so_in_the_tab(bot: Harness) -> None:
    await pending_scale(bot)
    bot.slack.fail_methods["conversations.members"] = "missing_scope"
    words = text_of(await open_home(bot, CAROL))
    assert "Unavailable right now" in words and "could not check which channels you are in" in words and "missing_scope" in words
    assert "*Waiting for your approval*" in words and "Approve" in json.dumps(bot.slack.home_views[CAROL]), "the rest is shown"


async def test_database_down_shows_what_is_unavailable(slack: FakeSlack, config: Config, state_db: str, redis_url: str,
                                                       kubeconfig: str, queue_prefix: str, tmp_path: Path) -> None:
    db, db_url = await TcpProxy.for_url(state_db)
    bot = await Harness.start(config=config, slack=slack, database_url=db_url, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix, spool_dir=str(tmp_path / "spool"))
    try:
        request = await pending_scale(bot)
        await open_home(bot, CAROL)
        db.down()
        words = text_of(await open_home(bot, CAROL, timeout=60))
        assert "Unavailable right now" in words and "your open requests, what you may approve" in words and "database" in words
        assert request.id not in words
        # A click while it is down is refused, told in the tab, and recorded (in the spool until the database is back).
        await bot.post_signed(slack.home_click_body(CAROL, request.id))

        async def told() -> str | None:
            words = text_of(slack.home_views[CAROL])
            return words if "not counted" in words else None
        assert "database" in await bot.eventually(told, timeout=60, what="the refusal in the Home tab")
        db.up()

        async def back() -> OpsRequest | None:
            # the pool reconnects with a backoff after the outage: until then a read is refused
            # (fail closed), which is right; what matters is that the refused click left no approval
            try:
                return await bot.runtime.store.get(request.id)
            except BackendUnavailable:
                return None
        again = await bot.eventually(back, timeout=60, what="the database to answer again")
        assert again.approvals == ()
    finally:
        db.up()
        await bot.stop()
        await db.stop()


@needs_browser
async def test_the_playground_shows_the_home_tab_and_its_approve_counts(playground: Any) -> None:
    from playwright.async_api import expect

    async def run() -> None:
        async with browser_page() as page:
            await page.goto(playground.url)
            incident = page.locator("#channel-C0INCIDENT")
            await expect(page.locator("#user option")).to_have_count(5)
            await page.select_option("#user", "U0ALICE")
            await page.fill("#composer", "/ops scale worker 6")
            await page.press("#composer", "Enter")
            await expect(incident).to_contain_text("waiting for approval", timeout=15000)
            await page.select_option("#user", "U0CAROL")
            await page.click("#open-home")
            home = page.locator("#home")
            await expect(home).to_contain_text("Waiting for your approval", timeout=15000)
            await expect(home).to_contain_text("nova-worker")
            await home.get_by_role("button", name="Approve").click()
            await expect(home).to_contain_text("You approved", timeout=15000)
            await expect(incident).to_contain_text("succeeded", timeout=20000)
            await shot(page, "home-tab.png")

    await asyncio.wait_for(run(), timeout=BROWSER_BUDGET)


async def test_the_event_subscription_url_answers_slacks_challenge(bot: Harness) -> None:
    """The manifest subscribes to app_home_opened: Slack first checks the request URL with a challenge."""
    status, body = await bot.post_signed(json.dumps({"token": "legacy", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                                                     "type": "url_verification"}), "application/json")
    assert status == 200 and "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in body


async def test_the_same_home_click_delivered_to_two_replicas_counts_once(bot: Harness, config: Config, slack: FakeSlack,
                                                                        state_db: str, redis_url: str, kubeconfig: str,
                                                                        queue_prefix: str) -> None:
    other = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                                queue_prefix=queue_prefix, with_worker=False)
    try:
        request = await pending_scale(bot)
        await open_home(other, CAROL)  # published by one replica, clicked on both
        body = slack.home_click_body(CAROL, request.id)
        statuses = await asyncio.gather(bot.post_signed(body), other.post_signed(body), bot.post_signed(body))
        assert [s for s, _ in statuses] == [200, 200, 200]
        done = await bot.state_of(request.id, "succeeded")
        assert [a.approver.user_id for a in done.approvals] == [CAROL]
        events = await bot.audit_events(request.id)
        assert events.count("approval_given") == 1 and events.count("started") == 1
        assert (await bot.runtime.audit.log.verify()).ok
    finally:
        await other.stop()


async def test_slack_refusing_to_publish_the_tab_is_logged_and_recorded_never_a_crash(bot: Harness) -> None:
    await pending_scale(bot)
    bot.slack.fail_methods["views.publish"] = "internal_error"
    assert (await bot.post_signed(bot.slack.home_opened_body(CAROL), "application/json"))[0] == 200

    async def recorded() -> dict[str, Any] | None:
        return next((r for r in await bot.runtime.audit.log.rows() if r["command_text"] == "(Home tab)"), None)
    row = await bot.eventually(recorded, what="the open to be recorded")
    assert row["result"]["home"]["published"] is False and CAROL not in bot.slack.home_views
    del bot.slack.fail_methods["views.publish"]
    assert "*Waiting for your approval*" in text_of(await open_home(bot, CAROL)), "the next open works"
