"""Undo (issue 14): the Undo button on a succeeded card and `/ops undo <request-id>`, through signed
Slack requests. An undo is a new request by the person who asks for it, through the same policy and
approvals; it is refused when the target has moved on since, when the request has no safe inverse or
did not succeed, and when the id is not one; two fast clicks open one undo."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from bot.domain import OpsRequest
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.slack_api import FakeSlack, Message
from tests.conftest import ALICE, BOTH, CAROL, DAN, EVE, MALLORY
from tests.harness import Harness, click_body, slash_body
from tests.scenarios.test_replicas import Fleet, eventually, fleet  # noqa: F401  (the two-replica fixture)


def replicas(kube: KubeApiServer, name: str = "nova-worker") -> int:
    return int(kube.cluster.get("apps/deployments", "nova", name)["spec"]["replicas"])


def api_image(kube: KubeApiServer) -> str:
    return str(kube.cluster.get("apps/deployments", "nova", "nova-api")["spec"]["template"]["spec"]["containers"][0]["image"])


def card(bot: Harness, request: OpsRequest) -> Message:
    return next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == request.card_ts)


def undo_click_body(slack: FakeSlack, user: str, value: str, *, card_ts: str, channel: str = Harness.INCIDENT,
                    action_id: str = "opsbot_undo") -> str:
    """What Slack posts when ``user`` clicks Undo on the card ``card_ts`` (``value``: the button's value)."""
    payload = {
        "type": "block_actions", "team": {"id": "T0FAKE", "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0FAKE"},
        "api_app_id": "A0OPS", "token": "legacy",
        "container": {"type": "message", "message_ts": card_ts, "channel_id": channel, "is_ephemeral": False},
        "trigger_id": uuid.uuid4().hex, "channel": {"id": channel, "name": "incident"},
        "message": {"ts": card_ts, "text": "card"}, "response_url": slack.response_url("click-" + uuid.uuid4().hex),
        "actions": [{"action_id": action_id, "block_id": f"opsbot_undo:{value[:40]}", "value": value, "type": "button",
                     "action_ts": str(time.time())}],
    }
    return urlencode({"payload": json.dumps(payload)})


async def click_undo(bot: Harness, user: str, request: OpsRequest, *, value: str | None = None) -> tuple[int, str]:
    return await bot.post_signed(undo_click_body(bot.slack, user, request.id if value is None else value, card_ts=request.card_ts or ""))


async def ephemeral(bot: Harness, user: str, text: str, *, count: int = 1) -> list[str]:
    async def probe() -> list[str] | None:
        found = [m.text for m in bot.slack.ephemeral_to(user) if text in m.text]
        return found if len(found) >= count else None
    return await bot.eventually(probe, what=f"{count} private answer(s) to {user} containing {text!r}")


async def answer(bot: Harness, user: str, text: str, containing: str) -> str:
    """Type ``text`` as ``user``; the private answer containing ``containing`` (through the response_url)."""
    await bot.slash(user, text)
    return str((await bot.response(containing=containing))["text"])


async def done(bot: Harness, user: str, text: str, approver: str = CAROL) -> OpsRequest:
    """A request typed by ``user`` and approved by ``approver``, run to success."""
    await bot.slash(user, text)
    request = await bot.requested()
    await bot.click(approver, request.id, "approve")
    finished = await bot.state_of(request.id, "succeeded", "failed", "stale", "unknown")
    assert finished.state.value == "succeeded", finished.error
    return finished


async def undo_of(bot: Harness, original: OpsRequest) -> list[OpsRequest]:
    async with bot.runtime.store.connection() as conn:
        rows = await (await conn.execute("SELECT id FROM ops_requests WHERE undo_of = %s ORDER BY created_at",
                                         (original.id,))).fetchall()
    found = [await bot.runtime.store.get(r["id"]) for r in rows]
    return [r for r in found if r is not None]


async def the_undo(bot: Harness, original: OpsRequest) -> OpsRequest:
    async def probe() -> OpsRequest | None:
        found = await undo_of(bot, original)
        return found[0] if found and found[0].card_ts else None
    return await bot.eventually(probe, what=f"the undo of {original.id} to be opened")


async def rows(bot: Harness, request_id: str, event: str) -> list[dict[str, Any]]:
    return [r for r in await bot.runtime.audit.log.rows(request_id) if r["event"] == event]


async def request_count(bot: Harness) -> int:
    async with bot.runtime.store.connection() as conn:
        row = await (await conn.execute("SELECT count(*) AS n FROM ops_requests")).fetchone()
    return int(row["n"]) if row else 0


# ---------------------------------------------------------------------------------------------- scale, by the button


async def test_undo_of_a_scale_by_the_button_goes_through_approval(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, '/ops scale worker 6 --reason "INC-142 backlog"')
    assert replicas(kube) == 6
    # The result carries an Undo button, on the card and (as the command) in its thread.
    c = card(bot, original)
    assert [b["text"]["text"] for b in c.buttons()] == ["Undo"]
    assert c.buttons()[0]["value"] == original.id and c.buttons()[0]["action_id"] == "opsbot_undo"
    done_reply = next(m for m in bot.slack.thread(Harness.INCIDENT, original.card_ts or "")
                      if m.text.startswith(":large_green_circle: Done"))
    assert f"/ops undo {original.id}" in done_reply.text
    assert [(b["text"]["text"], b["value"]) for b in done_reply.buttons()] == [("Undo", original.id)]

    # Dan (an approver) clicks Undo under the "Done" in the thread: a new request by Dan, through the
    # production policy: it needs an approval.
    status, _ = await bot.post_signed(undo_click_body(bot.slack, DAN, original.id, card_ts=done_reply.ts))
    assert status == 200
    undo = await the_undo(bot, original)
    assert undo.requester.user_id == DAN and undo.undo_of == original.id
    assert undo.state.value == "pending_approval", "an undo in production still needs its approvers"
    assert undo.command == "scale" and undo.plan["before"] == {"replicas": 6} and undo.plan["after"] == {"replicas": 3}
    assert undo.text == "scale worker 3" and undo.reason == f"undo of {original.id}"
    assert replicas(kube) == 6, "nothing happens before approval"
    text = card(bot, undo).all_text()
    assert f"Undo of `{original.id}`: *nova-worker: 6 → 3 replicas*" in text
    assert f"<https://fake.slack/archives/{Harness.INCIDENT}/p{(original.card_ts or '').replace('.', '')}|card of the request it undoes>" \
        in text, \
        "the new card links the original's card"
    assert [b["text"]["text"] for b in card(bot, undo).buttons()] == ["Approve", "Deny", "Cancel (requester)"]
    said = await ephemeral(bot, DAN, f"Undo of `{original.id}` requested as `{undo.id}`")
    assert "/ops scale worker 3" in said[0]

    # Linked in the audit trail both ways.
    requested = await rows(bot, undo.id, "requested")
    assert requested[0]["result"]["undo_of"] == original.id
    linked = await rows(bot, original.id, "undo_requested")
    assert len(linked) == 1 and linked[0]["result"]["undo"] == undo.id and linked[0]["actor_id"] == DAN

    async def in_audit_channel() -> bool:  # in the original's thread of the audit channel
        heads = [m for m in bot.slack.in_channel("C0AUDIT") if original.id in m.text]
        return bool(heads) and any("*undo requested*" in line and undo.id in line and linked[0]["hash"] in line
                                   for line in bot.audit_lines(thread_ts=heads[0].ts))
    await bot.eventually(in_audit_channel, what="the undo_requested row in the audit channel")

    # Dan cannot approve his own undo; Carol can.
    await bot.click(DAN, undo.id, "approve")
    await ephemeral(bot, DAN, "own request")
    await bot.click(CAROL, undo.id, "approve")
    finished = await bot.state_of(undo.id, "succeeded", "failed", "stale")
    assert finished.state.value == "succeeded", finished.error
    assert replicas(kube) == 3
    # An undo is a request like any other: it can be undone in turn (back to 6).
    assert [b["text"]["text"] for b in card(bot, finished).buttons()] == ["Undo"]
    await bot.slash(ALICE, f"/ops undo {finished.id}")
    redo = await the_undo(bot, finished)
    assert redo.plan["after"] == {"replicas": 6} and redo.state.value == "pending_approval"


# ---------------------------------------------------------------------------------------------- rollback, by command


async def test_undo_of_a_rollback_goes_back_to_the_revision_it_replaced(bot: Harness, kube: KubeApiServer) -> None:
    assert api_image(kube) == "ghcr.io/nova/api:1.4.2"
    original = await done(bot, ALICE, "/ops rollback api")
    assert api_image(kube) == "ghcr.io/nova/api:1.4.1"
    assert [b["text"]["text"] for b in card(bot, original).buttons()] == ["Undo"]

    await bot.slash(ALICE, f"/ops undo {original.id}")
    undo = await the_undo(bot, original)
    assert undo.text == "rollback api --to-revision 3"
    text = card(bot, undo).all_text()
    assert "revision 4 (nova-api=ghcr.io/nova/api:1.4.1) → 3 (nova-api=ghcr.io/nova/api:1.4.2)" in text
    assert "just rolled back from" not in text, "an undo re-applies it on purpose, by revision: no warning"
    await bot.click(CAROL, undo.id, "approve")
    finished = await bot.state_of(undo.id, "succeeded", "failed", "stale")
    assert finished.state.value == "succeeded", finished.error
    assert api_image(kube) == "ghcr.io/nova/api:1.4.2"


async def test_undo_of_a_rollback_is_stale_once_another_image_runs(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops rollback api")
    await done(bot, BOTH, "/ops rollback api --to-revision 1")
    assert api_image(kube) == "ghcr.io/nova/api:1.4.0"
    said = await answer(bot, ALICE, f"/ops undo {original.id}", "Not undone")
    assert (f"api runs nova-api=ghcr.io/nova/api:1.4.0 now, not the nova-api=ghcr.io/nova/api:1.4.1 that `{original.id}` "
            "rolled back to; nothing was requested") in said
    assert len(await undo_of(bot, original)) == 0 and api_image(kube) == "ghcr.io/nova/api:1.4.0"


async def test_a_second_rollback_says_it_reapplies_what_was_rolled_back_from(bot: Harness, kube: KubeApiServer) -> None:
    first = await done(bot, ALICE, '/ops rollback api --reason "1.4.2 breaks checkout"')
    assert "just rolled back from" not in card(bot, first).all_text(), "a first rollback re-applies nothing"
    await bot.slash(ALICE, "/ops rollback api")
    again = await bot.requested()
    text = card(bot, again).all_text()
    assert "revision 4 (nova-api=ghcr.io/nova/api:1.4.1) → 3 (nova-api=ghcr.io/nova/api:1.4.2)" in text
    assert "revision 3 (nova-api=ghcr.io/nova/api:1.4.2) is the one that was just rolled back from" in text
    assert "Rolling back again re-applies nova-api=ghcr.io/nova/api:1.4.2" in text
    assert "`/ops rollback api --to-revision 1`" in text
    assert again.plan["facts"]["reapplies_rolled_back"] is True and again.state.value == "pending_approval"
    # Asked for by revision, it is what was meant: no warning.
    await bot.slash(BOTH, "/ops rollback api --to-revision 3")
    explicit = await bot.requested()
    assert "just rolled back from" not in card(bot, explicit).all_text()


# ---------------------------------------------------------------------------------------------- provider, hpa, queue, flag


async def test_undo_of_disable_provider_enables_it(bot: Harness, platform_db: str) -> None:
    def active() -> bool:
        with psycopg.connect(platform_db) as conn:
            row = conn.execute('SELECT "isActive" FROM "Provider" WHERE name = %s', ("twilio",)).fetchone()
        assert row is not None
        return bool(row[0])

    original = await done(bot, ALICE, "/ops disable provider twilio")
    assert active() is False
    await click_undo(bot, ALICE, original)
    undo = await the_undo(bot, original)
    assert undo.command == "enable-provider" and "enable provider twilio: isActive false → true" in card(bot, undo).all_text()
    await bot.click(CAROL, undo.id, "approve")
    assert (await bot.state_of(undo.id, "succeeded", "failed", "stale")).state.value == "succeeded"
    assert active() is True


async def test_undo_of_hpa_puts_back_the_old_bounds(bot: Harness, kube: KubeApiServer) -> None:
    kube.cluster.create_hpa("nova", {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "nova-worker", "namespace": "nova"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nova-worker"},
                 "minReplicas": 2, "maxReplicas": 8}})
    original = await done(bot, ALICE, "/ops hpa worker --min 4 --max 12")
    await bot.slash(ALICE, f"/ops undo {original.id}")
    undo = await the_undo(bot, original)
    assert undo.text == "hpa worker --min 2 --max 8" and undo.plan["after"] == {"min": 2, "max": 8}


async def test_undo_of_queue_pause_resumes(bot: Harness) -> None:
    original = await done(bot, ALICE, "/ops queue pause billing-webhooks")
    await bot.slash(ALICE, f"/ops undo {original.id}")
    undo = await the_undo(bot, original)
    assert undo.command == "queue-resume" and undo.text == "queue resume billing-webhooks"
    await bot.click(CAROL, undo.id, "approve")
    assert (await bot.state_of(undo.id, "succeeded", "failed", "stale")).state.value == "succeeded"


# ---------------------------------------------------------------------------------------------- refusals


async def test_a_dry_run_undo_shows_the_inverse_and_requests_nothing(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    before = await request_count(bot)
    said = await answer(bot, ALICE, f"/ops undo {original.id} --dry-run", "Dry run")
    assert "nova-worker: 6 → 3 replicas" in said and "1 approval from approver required" in said
    assert await request_count(bot) == before and replicas(kube) == 6


async def test_undo_is_refused_as_stale_when_the_target_moved_on(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    await done(bot, BOTH, "/ops scale worker 4")  # someone changed it again since
    before = await request_count(bot)
    said = await answer(bot, ALICE, f"/ops undo {original.id}", "Not undone")
    assert f"worker is at 4 replicas now, not the 6 that `{original.id}` set; nothing was requested" in said
    assert await request_count(bot) == before and replicas(kube) == 4
    refused = await rows(bot, original.id, "undo_refused")
    assert len(refused) == 1 and refused[0]["result"]["why"] == "stale" and refused[0]["actor_id"] == ALICE
    # The same through the button (privately, and audited again).
    await click_undo(bot, ALICE, original)
    await ephemeral(bot, ALICE, "worker is at 4 replicas now")
    assert await request_count(bot) == before
    assert len(await rows(bot, original.id, "undo_refused")) == 2


async def test_undo_refused_when_someone_already_put_it_back(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    await done(bot, BOTH, "/ops scale worker 3")
    said = await answer(bot, ALICE, f"/ops undo {original.id}", "Not undone")
    assert "already has 3 replicas; nothing to do" in said and "Nothing was requested" in said


async def test_commands_without_a_safe_inverse_get_no_button_and_a_clear_refusal(bot: Harness) -> None:
    original = await done(bot, ALICE, "/ops restart worker")
    c = card(bot, original)
    assert c.buttons() == []
    assert "No undo: a restart has no inverse" in c.all_text()
    thread = bot.slack.thread(Harness.INCIDENT, original.card_ts or "")
    assert not any("/ops undo" in m.text or m.buttons() for m in thread)
    before = await request_count(bot)
    said = await answer(bot, ALICE, f"/ops undo {original.id}", "Not undone")
    assert "cannot be undone: a restart has no inverse" in said and "Nothing was requested" in said
    assert await request_count(bot) == before
    assert [r["result"]["why"] for r in await rows(bot, original.id, "undo_refused")] == ["no_inverse"]


async def test_replay_webhook_has_no_safe_inverse(bot: Harness) -> None:
    original = await done(bot, ALICE, "/ops replay webhook 8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51")
    assert card(bot, original).buttons() == []
    assert "`replay webhook` has no safe inverse" in card(bot, original).all_text()
    said = await answer(bot, ALICE, f"/ops undo {original.id}", "Not undone")
    assert "`replay webhook` has no safe inverse" in said


async def test_undo_of_a_request_that_did_not_succeed_is_refused_with_why(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale worker 6")
    pending = await bot.requested()
    said = await answer(bot, ALICE, f"/ops undo {pending.id}", "Not undone")
    assert "is still waiting for approval; nothing has run" in said and f"/ops cancel {pending.id}" in said
    await bot.click(CAROL, pending.id, "deny")
    await bot.state_of(pending.id, "denied")
    said = await answer(bot, ALICE, f"/ops undo {pending.id}", "Not undone")
    assert "was denied; nothing was run, so there is nothing to undo" in said
    assert [r["result"]["why"] for r in await rows(bot, pending.id, "undo_refused")] == ["pending_approval", "denied"]
    assert len(await undo_of(bot, pending)) == 0


async def test_kubernetes_down_at_undo_time_refuses_and_requests_nothing(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    before = await request_count(bot)
    kube.faults.add(path_re=r"/deployments", status=503)
    said = await answer(bot, ALICE, f"/ops undo {original.id}", "Not undone")
    assert "cannot check that the target is still as it was left" in said and "Nothing was requested" in said
    kube.faults.clear()
    assert await request_count(bot) == before
    refused = await rows(bot, original.id, "undo_refused")
    assert refused[-1]["result"]["why"] == "backend_unavailable"
    assert replicas(kube) == 6


@pytest.mark.parametrize(("text", "says"), [
    ("/ops undo", "takes one request id"),
    ("/ops undo r-abc r-def", "takes one request id"),
    ("/ops undo r-аbcdefgh", "CYRILLIC"),  # a Cyrillic а
    ("/ops undo ../../etc/passwd", "is not an opsbot request id"),
    ("/ops undo R-ABCDEFGH", "is not an opsbot request id"),
    ("/ops undo r-" + "a" * 1500, "is not an opsbot request id"),
    ("/ops undo 'r-abcd; DROP TABLE ops_requests'", "is not an opsbot request id"),
    ("/ops undo r-abcdefgh --reason", "takes one request id"),
])
async def test_hostile_ids_are_a_usage_error_and_audited(bot: Harness, text: str, says: str) -> None:
    status, body = await bot.slash(ALICE, text)
    assert status == 200 and says in body, body
    assert "/ops undo <request-id>" in body
    assert len(body) < 2000
    assert await bot.last_request() is None
    assert "invalid" in await bot.eventually(bot.audit_events, what="the audit row")


async def test_a_well_formed_id_of_no_request_is_refused_and_audited(bot: Harness) -> None:
    said = await answer(bot, ALICE, "/ops undo r-zzzzzzzz", "Not undone")
    assert "there is no request `r-zzzzzzzz`" in said
    refused = [r for r in await bot.runtime.audit.log.rows() if r["event"] == "undo_refused"]
    assert refused[0]["request_id"] is None and refused[0]["result"]["request_id_given"] == "r-zzzzzzzz"


async def test_forged_undo_button_values_are_refused(bot: Harness) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    for value in ("r-x\x00y", "'; DROP TABLE ops_requests; --", "r-" + "b" * 3000, ""):
        await click_undo(bot, MALLORY, original, value=value)
    said = await ephemeral(bot, MALLORY, ":x:", count=4)
    assert all("is not an opsbot request id" in s or "invisible character" in s for s in said), said
    assert all(len(s) < 2000 for s in said)
    assert len(await undo_of(bot, original)) == 0


# ---------------------------------------------------------------------------------------------- two fast clicks


async def test_two_fast_undo_clicks_open_one_undo(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    await asyncio.gather(click_undo(bot, DAN, original), click_undo(bot, CAROL, original), click_undo(bot, DAN, original))
    undo = await the_undo(bot, original)

    async def all_answered() -> bool:
        answers = [m.text for u in (DAN, CAROL) for m in bot.slack.ephemeral_to(u) if "ndo" in m.text]
        return len(answers) >= 3
    await bot.eventually(all_answered, what="every click to be answered")
    await asyncio.sleep(0.5)
    assert [r.id for r in await undo_of(bot, original)] == [undo.id], "one undo, not two"
    refused = await rows(bot, original.id, "undo_refused")
    assert len(refused) == 2 and {r["result"]["why"] for r in refused} == {"duplicate"}
    assert all(r["result"]["undo"] == undo.id for r in refused)
    told = [m.text for u in (DAN, CAROL) for m in bot.slack.ephemeral_to(u) if "being undone already" in m.text]
    assert len(told) == 2 and all(undo.id in t for t in told)
    opened = [m.text for m in bot.slack.ephemeral_to(undo.requester.user_id) if f"requested as `{undo.id}`" in m.text]
    assert len(opened) == 1
    # Once it is denied, undoing is possible again (the one-undo rule covers open and succeeded undos).
    await bot.click(CAROL if undo.requester.user_id != CAROL else DAN, undo.id, "deny")
    await bot.state_of(undo.id, "denied")
    await bot.slash(ALICE, f"/ops undo {original.id}")

    async def second() -> OpsRequest | None:
        found = await undo_of(bot, original)
        return found[-1] if len(found) == 2 and found[-1].card_ts else None
    again = await bot.eventually(second, what="a new undo after the denied one")
    assert again.state.value == "pending_approval"


# ---------------------------------------------------------------------------------------------- a flag action


async def test_undo_of_a_flag_sets_back_the_value_it_found_and_ends_its_auto_revert(bot: Harness, platform_db: str) -> None:
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE feature_flags (key text PRIMARY KEY, enabled boolean NOT NULL);"
                     "INSERT INTO feature_flags VALUES ('support.maintenance_mode', false)")

    def enabled() -> bool:
        with psycopg.connect(platform_db) as conn:
            row = conn.execute("SELECT enabled FROM feature_flags WHERE key = 'support.maintenance_mode'").fetchone()
        assert row is not None
        return bool(row[0])

    original = await done(bot, ALICE, "/ops maintenance on")
    assert enabled() is True
    await click_undo(bot, ALICE, original)
    undo = await the_undo(bot, original)
    assert undo.text == "maintenance off" and "maintenance: on → off" in card(bot, undo).all_text()
    await bot.click(CAROL, undo.id, "approve")
    assert (await bot.state_of(undo.id, "succeeded", "failed", "stale")).state.value == "succeeded"
    assert enabled() is False
    async with bot.runtime.store.connection() as conn:
        row = await (await conn.execute("SELECT outcome FROM scheduled_reverts WHERE request_id = %s", (original.id,))).fetchone()
    assert row is not None and row["outcome"] == "superseded", "the undo put it back: the 2h auto-revert ends, none is added"


async def test_someone_the_policy_does_not_let_scale_cannot_undo_a_scale(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    before = await request_count(bot)
    await click_undo(bot, EVE, original)  # an auditor: may read, may not scale
    said = await ephemeral(bot, EVE, "Not allowed")
    assert "scale" in said[0]
    assert await request_count(bot) == before and replicas(kube) == 6
    assert len(await undo_of(bot, original)) == 0
    # The refusal is on the original's trail too, where its undos are followed, and said once.
    rows = [r for r in await bot.runtime.audit.log.rows(original.id) if r["event"] == "undo_refused"]
    assert len(rows) == 1 and rows[0]["result"]["why"] == "policy_denied" and rows[0]["actor_id"] == EVE
    assert not [m for m in bot.slack.ephemeral_to(EVE) if "Not undone" in m.text], "answered once, by the policy refusal"


async def test_two_replicas_each_given_an_undo_click_open_one_undo(fleet: Fleet) -> None:  # noqa: F811
    one, two = fleet.servers
    assert await fleet.post(one, slash_body(fleet.slack, ALICE, "scale worker 4")) == 200
    first, card_ts = await fleet.new_request(0)
    assert await fleet.post(two, click_body(fleet.slack, CAROL, first, card_ts)) == 200
    assert await fleet.state(first, "succeeded", "failed", "stale", "unknown") == "succeeded"
    # Dan on one replica, Carol on the other, at the same instant.
    assert await asyncio.gather(fleet.post(one, undo_click_body(fleet.slack, DAN, first, card_ts=card_ts)),
                                fleet.post(two, undo_click_body(fleet.slack, CAROL, first, card_ts=card_ts))) == [200, 200]

    async def both_answered() -> list[tuple[Any, ...]] | None:
        refused = fleet.rows("SELECT result->>'undo' FROM audit_events WHERE request_id = %s AND event = 'undo_refused'", first)
        undos = fleet.rows("SELECT id FROM ops_requests WHERE undo_of = %s", first)
        return undos if refused and undos else None

    undos = await eventually(both_answered, what="one undo opened and the other click refused")
    await asyncio.sleep(1.0)  # time for a second undo to show up, if there were one
    assert len(fleet.rows("SELECT id FROM ops_requests WHERE undo_of = %s", first)) == 1
    refused = fleet.rows("SELECT result->>'undo', result->>'why' FROM audit_events WHERE request_id = %s AND event = 'undo_refused'",
                         first)
    assert refused == [(undos[0][0], "duplicate")]
    assert fleet.events(first).count("undo_requested") == 1


async def test_a_slow_cluster_at_undo_time_is_said_and_the_undo_still_opens(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    kube.faults.add(method="GET", path_re=r"/deployments/nova-worker$", hang=3.0, times=1)
    await click_undo(bot, ALICE, original)
    await ephemeral(bot, ALICE, "Still working on it")
    undo = await the_undo(bot, original)
    assert undo.plan["after"] == {"replicas": 3}
    said = await ephemeral(bot, ALICE, f"requested as `{undo.id}`")
    assert len(said) == 1


async def test_request_again_on_a_denied_undo_is_an_undo_again(bot: Harness, kube: KubeApiServer) -> None:
    original = await done(bot, ALICE, "/ops scale worker 6")
    await bot.slash(ALICE, f"/ops undo {original.id}")
    undo = await the_undo(bot, original)
    await bot.click(CAROL, undo.id, "deny")
    denied = await bot.state_of(undo.id, "denied")
    assert "Request again" in [b["text"]["text"] for b in card(bot, denied).buttons()]
    await bot.post_signed(undo_click_body(bot.slack, ALICE, undo.id, card_ts=denied.card_ts or "", action_id="opsbot_request_again"))

    async def second() -> OpsRequest | None:
        found = await undo_of(bot, original)
        return found[-1] if len(found) == 2 and found[-1].card_ts else None
    again = await bot.eventually(second, what="the undo asked again")
    assert again.undo_of == original.id and again.plan["after"] == {"replicas": 3}

    async def linked() -> bool:  # (recorded just after the new card is posted)
        return len(await rows(bot, original.id, "undo_requested")) == 2
    await bot.eventually(linked, what="the second undo_requested row")
