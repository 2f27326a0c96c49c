"""Everything that must not happen, and the clear answer people get instead."""

from __future__ import annotations

import asyncio
import json

import psycopg

from bot.sandbox.kube_apiserver import KubeApiServer
from commands.registry import commands_of
from tests.conftest import ALICE, CAROL, DAN, EVE
from tests.harness import Harness


def replicas(kube: KubeApiServer) -> int:
    return int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"])


async def test_bad_signature_gets_401_and_does_nothing(bot: Harness) -> None:
    status, _ = await bot.post_signed("command=%2Fops&text=scale+worker+6&user_id=U0ALICE&channel_id=C1",
                                      signature="v0=" + "0" * 64)
    assert status == 401
    status, _ = await bot.post_signed("command=%2Fops&text=scale+worker+6", timestamp=1_000_000_000)  # replayed, too old
    assert status == 401
    assert bot.slack.calls_to("chat.postMessage") == []
    assert await bot.audit_events() == []


async def test_malformed_commands_say_what_to_type(bot: Harness) -> None:
    cases = {
        "scale worker": "needs a replica count",
        "scale worker six": "replicas must be a whole number",
        "scale": "needs a deployment",
        "scale wrkr 3": "unknown deployment `wrkr`. Known deployments: api, worker.",
        "replay": "Did you mean: `/ops replay webhook <event-id>`",
        "deploy api": "unknown command `deploy`",
        'scale worker 3 --reason "unterminated': "a quote is not closed",
        "rollback api --to-revision two": "`--to-revision` must be a whole number",
        "scale worker 3 --force": "unknown option `--force`",
        "status api extra": "unexpected argument `extra`",
    }
    for text, expected in cases.items():
        status, body = await bot.slash(ALICE, f"/ops {text}")
        assert status == 200
        assert expected in body, (text, body)
    assert bot.slack.in_channel(Harness.INCIDENT) == [], "no card for malformed commands"

    async def all_recorded() -> list[str] | None:
        events = await bot.audit_events()
        return events if len(events) == len(cases) else None

    assert await bot.eventually(all_recorded, what="audit rows") == ["invalid"] * len(cases)
    async def lines():  # type: ignore[no-untyped-def]
        posted = bot.audit_lines()  # (the poster may put several rows in one message)
        return posted if len(posted) >= len(cases) else None

    assert len(await bot.eventually(lines, what="the audit lines")) == len(cases), "one line per invalid attempt"


async def test_double_click_and_clicks_after_the_decision_change_nothing(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 4")
    request = await bot.requested()
    # Two approvers click at the same moment on a 1-of-M request: exactly one execution.
    await asyncio.gather(bot.click(CAROL, request.id), bot.click(DAN, request.id), bot.click(CAROL, request.id))
    done = await bot.state_of(request.id, "succeeded", "failed")
    assert done.state.value == "succeeded"
    await asyncio.sleep(0.5)  # give any duplicate execution the chance to show itself
    events = await bot.audit_events(request.id)
    assert events.count("started") == 1 and events.count("approved") == 1
    assert len([r for r in kube.cluster.requests if r[1].endswith("/nova-worker/scale")]) == 1
    assert replicas(kube) == 4
    # A late click is told the request is closed.
    await bot.click(DAN, request.id, "deny")
    msg = await bot.eventually(lambda: _last_ephemeral(bot, DAN, "already succeeded"), what="a 'closed' notice")
    assert "nothing changed" in msg


async def test_deny_ends_the_request(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 9")
    request = await bot.requested()
    await bot.click(DAN, request.id, "deny")
    done = await bot.state_of(request.id, "denied")
    await bot.click(CAROL, request.id, "approve")
    await bot.eventually(lambda: _last_ephemeral(bot, CAROL, "already denied"), what="a refusal")
    assert (await bot.runtime.store.get(request.id)).state.value == "denied"  # type: ignore[union-attr]
    assert replicas(kube) == 3
    assert await bot.audit_events(request.id) == ["requested", "denied", "vote_refused"]  # the late click is on record too
    thread = bot.slack.thread(Harness.INCIDENT, done.card_ts or "")
    assert any(f"Denied by <@{DAN}>" in m.text for m in thread)


async def test_expired_requests_cannot_be_approved(bot: Harness, kube: KubeApiServer, state_db: str) -> None:
    await bot.slash(ALICE, "/ops scale worker 7")
    request = await bot.requested()
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE ops_requests SET expires_at = now() - interval '1 second' WHERE id = %s", (request.id,))
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "expired")
    assert replicas(kube) == 3

    async def updated_card():  # type: ignore[no-untyped-def]
        card = next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == done.card_ts)
        return card if card.history else None

    card = await bot.eventually(updated_card, what="the card update")
    assert "expired" in card.all_text() and [b["action_id"] for b in card.buttons()] == ["opsbot_request_again"]
    assert await bot.audit_events(request.id) == ["requested", "expired", "vote_refused"]


async def test_the_sweeper_expires_requests_nobody_answered(bot: Harness, state_db: str) -> None:
    await bot.slash(ALICE, "/ops scale worker 7")
    request = await bot.requested()
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE ops_requests SET expires_at = now() WHERE id = %s", (request.id,))
    await bot.state_of(request.id, "expired")
    thread = await bot.eventually(lambda: _async(bot.slack.thread(Harness.INCIDENT, request.card_ts or "")), what="thread")
    assert "Expired without enough approvals" in thread[-1].text


async def test_dry_run_shows_the_plan_and_changes_nothing(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 6 --dry-run")
    reply = await bot.response(containing="Dry run")
    assert "nova-worker: 3 → 6 replicas" in reply["text"] and "1 approval from approver required by production-changes" in reply["text"]
    assert "• target: `worker (nova/nova-worker)` · environment: *production*" in reply["text"]
    assert reply["text"].count("environment") == 1
    assert await bot.last_request() is None and replicas(kube) == 3


async def test_status_is_read_only_and_needs_no_approval(bot: Harness) -> None:
    await bot.slash(EVE, "/ops status api")
    reply = await bot.response(containing="nova-api")
    assert reply["response_type"] == "in_channel"
    for expected in ("replicas: 3 desired, 3 ready, 3 updated", "revision: 3", "nova-api=ghcr.io/nova/api:1.4.2",
                     "rollout: NewReplicaSetAvailable"):
        assert expected in reply["text"], expected
    assert await bot.audit_events() == ["read"]


async def test_help_shows_only_what_the_caller_may_run(bot: Harness) -> None:
    await bot.slash(EVE, "/ops help")
    reply = await bot.response(containing="opsbot commands")
    assert "/ops status <deployment>" in reply["text"] and "/ops audit" in reply["text"]
    every = commands_of(bot.runtime.pipeline.config)  # the built-ins and the example's own actions
    shown = [c for c in every if f"`{c.usage}`" in reply["text"]]
    assert "/ops scale" not in reply["text"] and "/ops logs" not in reply["text"], "auditors read the trail, not logs"
    hidden = len(every) - len(shown)
    assert f"{hidden} more {'command exists' if hidden == 1 else 'commands exist'}" in reply["text"] and len(shown) >= 4
    await bot.slash(ALICE, "/ops help")
    reply = await bot.response(containing="/ops scale")
    assert "needs 1 approval from approver" in reply["text"] and "/ops audit" not in reply["text"]


async def test_cluster_down_fails_closed(bot: Harness, kube: KubeApiServer) -> None:
    kube.stop()
    await bot.slash(ALICE, "/ops scale worker 6")
    reply = await bot.response(containing="Refused")
    assert "Kubernetes API is unavailable" in reply["text"] and "Nothing was changed" in reply["text"]
    assert await bot.last_request() is None


async def test_health_readiness_and_metrics(bot: Harness) -> None:
    import aiohttp

    await bot.slash(ALICE, "/ops scale worker 6 --dry-run")
    await bot.response(containing="Dry run")
    async with aiohttp.ClientSession() as http:
        async with http.get(bot.url + "/healthz") as r:
            assert r.status == 200
        async with http.get(bot.url + "/readyz") as r:
            body = json.loads(await r.text())
            assert r.status == 200 and body == {"ready": True, "checks": {"config": "ok", "database": "ok", "redis": "ok"}}
        async with http.get(bot.url + "/metrics") as r:
            text = await r.text()
            assert 'opsbot_requests_total{command="scale",outcome="dry_run"} 1.0' in text
            assert "opsbot_approval_latency_seconds_bucket" in text and "opsbot_execution_duration_seconds" in text


async def test_readiness_fails_when_redis_is_down(bot: Harness) -> None:
    import aiohttp

    await bot.runtime.actions.close()
    bot.runtime.actions.__init__(bot.runtime.redis.client("redis://127.0.0.1:1/0"), "opsbot-actions")  # type: ignore[misc]
    async with aiohttp.ClientSession() as http, http.get(bot.url + "/readyz") as r:
        body = json.loads(await r.text())
    assert r.status == 503 and body["ready"] is False and body["checks"]["database"] == "ok"
    assert "Redis is unavailable" in body["checks"]["redis"]


async def _last_ephemeral(bot: Harness, user: str, containing: str) -> str | None:
    msgs = [m.text for m in bot.slack.ephemeral_to(user) if containing in m.text]
    return msgs[-1] if msgs else None


async def _async(value: object) -> object:
    return value


async def test_a_card_that_cannot_be_posted_ends_the_request_and_says_why(bot: Harness, kube: KubeApiServer) -> None:
    bot.slack.fail_methods["chat.postMessage"] = "not_in_channel"
    await bot.slash(ALICE, "/ops scale worker 5")
    reply = await bot.response(containing="approval card")
    assert "Slack refused to post the approval card: not_in_channel (invite the opsbot app to this channel" in reply["text"]
    request = await bot.eventually(bot.last_request, what="the request row")
    assert request.state.value == "failed" and replicas(kube) == 3
    assert await bot.eventually(lambda: _events(bot, request.id, 2), what="audit rows") == ["requested", "failed"]


async def _events(bot: Harness, request_id: str, n: int) -> list[str] | None:
    events = await bot.audit_events(request_id)
    return events if len(events) >= n else None


async def test_help_explains_the_request_commands_too(bot: Harness) -> None:
    """`/ops help undo` (and the other commands about requests and the record) says what it does and
    whether you may run it, instead of "no command"."""
    for topic, says in (("undo", "inverse of a request that succeeded"), ("pending", "you may approve"),
                        ("cancel", "Withdraw your own request")):
        await bot.slash(ALICE, f"/ops help {topic}")
        answer = await bot.response(containing=says)
        assert "no command `" not in answer["text"] and "You may run it." in answer["text"], answer["text"]
    await bot.slash(ALICE, "/ops help timeline")
    assert "You may not run it" in (await bot.response(containing="verify --file"))["text"], "alice is no auditor"
