"""Runbook: "Scale worker: kubectl scale deploy/nova-worker --replicas=6" (seed 003), from chat."""

from __future__ import annotations

from bot.sandbox.kube_apiserver import KubeApiServer
from tests.conftest import ALICE, BOTH, CAROL, MALLORY
from tests.harness import Harness


def replicas(kube: KubeApiServer, name: str = "nova-worker") -> int:
    return int(kube.cluster.get("apps/deployments", "nova", name)["spec"]["replicas"])


async def test_engineer_scales_worker_after_approval(bot: Harness, kube: KubeApiServer) -> None:
    status, _body = await bot.slash(ALICE, '/ops scale worker 6 --reason "INC-142 queue backlog"')
    assert status == 200

    request = await bot.requested()
    assert request.state.value == "pending_approval"
    card = bot.slack.in_channel(Harness.INCIDENT)[-1]
    assert "nova-worker: 3 → 6 replicas" in card.all_text()
    assert "INC-142 queue backlog" in card.all_text()
    assert [b["text"]["text"] for b in card.buttons()] == ["Approve", "Deny", "Cancel (requester)"]
    assert replicas(kube) == 3, "nothing happens before approval"

    await bot.click(CAROL, request.id, "approve")
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert replicas(kube) == 6
    scale_calls = [r for r in kube.cluster.requests if r[1].endswith("/deployments/nova-worker/scale")]
    assert scale_calls == [("PATCH", "/apis/apps/v1/namespaces/nova/deployments/nova-worker/scale", "application/merge-patch+json")]

    # The card shows who approved and the outcome; the thread has the result.
    card = next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == done.card_ts)
    assert f"<@{CAROL}>" in card.all_text() and "succeeded" in card.all_text()
    assert [b["text"]["text"] for b in card.buttons()] == ["Undo"]  # (tests/scenarios/test_undo.py)
    thread = bot.slack.thread(Harness.INCIDENT, done.card_ts or "")
    assert any("scaled 3 → 6" in m.text for m in thread)

    # The whole story, in order, in the audit table and in the audit channel: one headline message
    # for the request (updated to its final state) and each step, with its row hash, in its thread.
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "succeeded", "followed"]
    rows = await bot.runtime.audit.log.rows(request.id)

    async def steps_posted():  # type: ignore[no-untyped-def]
        heads = [m for m in bot.slack.in_channel("C0AUDIT") if request.id in m.text]
        return heads if heads and len(bot.audit_lines(thread_ts=heads[0].ts)) == len(rows) else None

    heads = await bot.eventually(steps_posted, what="the audit thread")
    assert len(heads) == 1
    steps = bot.audit_lines(thread_ts=heads[0].ts)  # (several rows may share a message)
    assert len(rows) == 6 and all(r["hash"] in line for r, line in zip(rows, steps, strict=True))
    assert "*succeeded*" in steps[-2] and "nova-worker: 3 → 6 replicas" in steps[-2]
    assert "successfully rolled out" in steps[-1]

    async def headline_final():  # type: ignore[no-untyped-def]
        head = next(m for m in bot.slack.in_channel("C0AUDIT") if request.id in m.text)
        return head if "succeeded" in head.text and rows[-1]["hash"] in head.text else None

    head = await bot.eventually(headline_final, what="the headline update")
    assert f"<@{ALICE}>" in head.text and "approval card" in head.text
    # …and the approval card links back to the audit record.
    card = next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == done.card_ts)
    assert f"https://fake.slack/archives/C0AUDIT/p{heads[0].ts.replace('.', '')}" in card.all_text()


async def test_replicas_outside_range_are_refused_with_the_range(bot: Harness, kube: KubeApiServer) -> None:
    status, body = await bot.slash(ALICE, "/ops scale worker 40")
    assert status == 200
    assert "1 to 20 replicas" in body and "/ops scale worker 20" in body
    assert await bot.last_request() is None
    assert replicas(kube) == 3
    assert await bot.eventually(bot.audit_events, what="the audit row") == ["invalid"]


async def test_self_approval_does_not_count(bot: Harness, kube: KubeApiServer) -> None:
    # U0BOTH is engineer *and* approver: still cannot approve their own request.
    await bot.slash(BOTH, "/ops scale worker 5")
    request = await bot.requested()
    await bot.click(BOTH, request.id, "approve")
    await bot.eventually(lambda: _async(bot.slack.ephemeral_to(BOTH)), what="an ephemeral refusal")
    assert "cannot approve your own request" in bot.slack.ephemeral_to(BOTH)[-1].text
    assert (await bot.runtime.store.get(request.id)).state.value == "pending_approval"  # type: ignore[union-attr]
    assert replicas(kube) == 3


async def test_non_approver_click_changes_nothing(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    await bot.click(MALLORY, request.id, "approve")
    await bot.eventually(lambda: _async(bot.slack.ephemeral_to(MALLORY)), what="an ephemeral refusal")
    assert "cannot approve this" in bot.slack.ephemeral_to(MALLORY)[-1].text
    again = await bot.runtime.store.get(request.id)
    assert again is not None and again.state.value == "pending_approval" and again.approvals == ()
    assert replicas(kube) == 3


async def test_unknown_user_is_denied_by_policy(bot: Harness) -> None:
    await bot.slash(MALLORY, "/ops scale worker 5")
    reply = await bot.response(containing="Not allowed")
    assert "you may not run `scale`" in reply["text"]
    assert reply["response_type"] == "ephemeral"
    assert await bot.last_request() is None
    assert await bot.audit_events() == ["policy_denied"]


async def _async(value: object) -> object:
    return value
