"""Every attempt recorded, every message eventually right (issue 8): faults, bursts and hostile input.

Each test names the defect it pins down. Slack and Kubernetes are the emulators with injected
faults; PostgreSQL and Redis are real, taken down or frozen through a TCP proxy
(tests/faults/proxy.py) where a test needs that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
import pytest_asyncio

from bot.config import Config
from bot.errors import BackendUnavailable
from bot.notices import MAX_UNCERTAIN
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, CAROL, DAN, EVE, MALLORY
from tests.faults.proxy import TcpProxy
from tests.harness import Harness


def replicas(kube: KubeApiServer) -> int:
    return int(kube.cluster.get("apps/deployments", "nova", "nova-worker")["spec"]["replicas"])


async def rows(bot: Harness, event: str | None = None) -> list[dict[str, Any]]:
    try:
        found = await bot.runtime.audit.log.rows()
    except BackendUnavailable:  # the pool is still reconnecting after an outage
        return []
    return [r for r in found if event is None or r["event"] == event]


async def wait_rows(bot: Harness, event: str, n: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        found = await rows(bot, event)
        return found if len(found) >= n else None
    return await bot.eventually(probe, timeout=timeout, what=f"{n} `{event}` audit row(s)")


def card(bot: Harness, ts: str | None) -> Any:
    return next(m for m in bot.slack.in_channel(Harness.INCIDENT) if m.ts == ts)


def retry_now(state_db: str) -> None:
    """Skip the back-off waits (they are seconds to minutes; the tests are about what happens next)."""
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE ops_requests SET card_next_attempt_at = now()")
        conn.execute("UPDATE chat_outbox SET next_attempt_at = now()")
        conn.execute("UPDATE audit_outbox SET next_attempt_at = now()")


# ---------------------------------------------------------------------------- 1. the channel after a Slack outage

async def test_after_a_slack_outage_the_card_and_thread_tell_the_truth(bot: Harness, kube: KubeApiServer, state_db: str) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    bot.slack.down = True  # Slack's Web API answers 503; clicks still arrive (Slack's edge is another system)
    await bot.click(CAROL, request.id)

    async def succeeded() -> bool:
        r = await bot.runtime.store.get(request.id)
        return bool(r and r.state.value == "succeeded")

    await bot.eventually(succeeded, what="the request to run during the outage")
    assert replicas(kube) == 5
    await asyncio.sleep(0.6)  # several poster rounds fail meanwhile
    assert "waiting for approval" in card(bot, request.card_ts).all_text(), "Slack still shows the old card"
    bot.slack.down = False
    retry_now(state_db)
    done = await bot.state_of(request.id, "succeeded")  # waits for the "Done" reply in the thread

    async def card_right() -> bool:
        return "succeeded" in card(bot, done.card_ts).all_text()

    await bot.eventually(card_right, what="the card to show the final state")
    c = card(bot, done.card_ts)
    assert [b["text"]["text"] for b in c.buttons()] == ["Undo"] and "waiting for approval" not in c.all_text()
    thread = [m.text for m in bot.slack.thread(Harness.INCIDENT, done.card_ts or "")]
    assert sum(t.startswith(":large_green_circle: Done") for t in thread) == 1, thread


async def test_latest_card_state_wins_after_many_changes_during_an_outage(bot: Harness, state_db: str) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    bot.slack.down = True
    await bot.click(CAROL, request.id)
    await bot.eventually(lambda: _state(bot, request.id, "succeeded"), what="success")
    await bot.eventually(lambda: _async(not bot.runtime.executor.following), what="the rollout to be followed to its end")
    updates_during = len(bot.slack.calls_to("chat.update"))
    bot.slack.down = False
    retry_now(state_db)
    await bot.state_of(request.id, "succeeded")
    await bot.eventually(lambda: _async("succeeded" in card(bot, request.card_ts).all_text()), what="card")
    await asyncio.sleep(0.5)
    # approved, started, succeeded happened during the outage: the updates afterwards show only the
    # last state, never the ones in between. (There can be a second update: the audit poster, also
    # catching up, gives the card its link to the audit record once that headline exists.)
    card_updates = [a for a in bot.slack.calls_to("chat.update")[updates_during:] if a.get("ts") == request.card_ts]
    assert 1 <= len(card_updates) <= 2, card_updates
    shown = [json.dumps(a.get("blocks")) for a in card_updates]
    assert all("succeeded" in b and "running" not in b and "approved, queued" not in b for b in shown), shown


# ---------------------------------------------------------------------------- 5. Retry-After, and the channel's order

async def test_slack_429_retry_after_is_honoured_per_method(bot: Harness, state_db: str) -> None:
    bot.slack.rate_limited["chat.postMessage"] = 3
    for n in range(3):
        await bot.slash(ALICE, f"/ops scale wrkr {n + 1}")
    await wait_rows(bot, "invalid", 3)
    await asyncio.sleep(2.0)  # inside the 3 s window
    assert len(bot.slack.calls_to("chat.postMessage")) == 1, "one call got the 429; nothing else was sent during Retry-After"
    bot.slack.rate_limited.clear()

    async def posted() -> bool:
        return await bot.runtime.audit.log.unposted() == 0

    await bot.eventually(posted, timeout=10, what="the audit channel to catch up after Retry-After")
    lines = bot.audit_lines()
    assert [int(t.split("`#")[1].split("`")[0]) for t in lines] == [1, 2, 3]


async def test_the_audit_channel_keeps_seq_order_after_an_outage(bot: Harness, state_db: str) -> None:
    bot.slack.down = True
    await bot.slash(ALICE, "/ops scale wrkr 1")
    first = (await wait_rows(bot, "invalid", 1))[0]

    async def attempted() -> bool:
        with psycopg.connect(state_db) as conn:
            row = conn.execute("SELECT attempts FROM audit_outbox WHERE seq = %s", (first["seq"],)).fetchone()
        return bool(row and row[0] >= 1)

    await bot.eventually(attempted, what="a failed post of the first row")
    bot.slack.down = False  # Slack is back while row 1 waits for its retry time…
    await bot.slash(ALICE, "/ops scale wrkr 2")  # …and row 2 arrives: it must not overtake row 1
    await wait_rows(bot, "invalid", 2)

    async def posted() -> bool:
        return await bot.runtime.audit.log.unposted() == 0

    await bot.eventually(posted, timeout=10, what="the audit channel to catch up")
    lines = bot.audit_lines()
    assert len(lines) == 2 and "`#1`" in lines[0] and "`#2`" in lines[1], lines


# ---------------------------------------------------------------------------- 6. bounded retries of uncertain posts

async def test_a_post_that_keeps_arriving_late_is_not_repeated_without_bound(bot: Harness, state_db: str) -> None:
    bot.runtime.chat.client.timeout = 1
    bot.slack.slow_methods["chat.postMessage"] = 1.5  # Slack posts it, but answers after our timeout
    bot.slack.fail_methods["conversations.history"] = "missing_scope"  # and we cannot look whether it arrived
    await bot.slash(MALLORY, "/ops scale wrkr 5")
    row = (await wait_rows(bot, "invalid", 1))[0]

    async def given_up() -> bool:
        retry_now(state_db)
        with psycopg.connect(state_db) as conn:
            r = conn.execute("SELECT gave_up FROM audit_outbox WHERE seq = %s", (row["seq"],)).fetchone()
        return bool(r and r[0])

    await bot.eventually(given_up, timeout=30, what="the poster to give up")
    copies = [m for m in bot.slack.in_channel("C0AUDIT") if row["hash"] in m.text]
    assert 1 <= len(copies) <= MAX_UNCERTAIN
    before = len(bot.slack.calls_to("chat.postMessage"))
    retry_now(state_db)
    await asyncio.sleep(0.8)
    assert len(bot.slack.calls_to("chat.postMessage")) == before, "nothing more is tried once given up"
    assert 'opsbot_messages_given_up_total{channel_kind="audit"} 1.0' in _metrics(bot)


# ---------------------------------------------------------------------------- 2/3. every attempt audited and answered

HOSTILE = {
    "scale worker 6\x00": "invisible character (U+0000 NULL)",
    "scale worker ²": "`²` uses U+00B2 SUPERSCRIPT TWO. Type `2`",
    "scale worker ６": "Type `6`",
    "scale worker ٦": "U+0666 ARABIC-INDIC DIGIT SIX",
    "rollback api --to-revision --1": "`--to-revision` must be a whole number",
    "scale worker 3 --reason a --reason b": "`--reason` is given twice",
    "audit --page 99999999999999999999": "is too large",
    "scale wоrker 3": "U+043E CYRILLIC SMALL LETTER O",
    "status api \x1b[31m": "U+001B ESCAPE",
    "scale worker 3 --reason \u202egnp.exe": "U+202E RIGHT-TO-LEFT OVERRIDE",
    "scale worker 99999999999": "is too large",
    "x" * 5000: "opsbot reads at most 2,000",
}


async def test_hostile_commands_get_an_answer_and_a_row(bot: Harness) -> None:
    for text, expected in HOSTILE.items():
        status, body = await bot.slash(ALICE, f"/ops {text}")
        assert status == 200, (text, status, body)
        assert expected in body, (text, body)
    invalid = await wait_rows(bot, "invalid", len(HOSTILE))
    stored = [r["command_text"] for r in invalid]
    assert "scale worker 6\\x00" in stored, "NUL escaped, not dropped"
    assert "status api \\x1b[31m" in stored and "scale worker 3 --reason \\u202egnp.exe" in stored
    assert any(t.startswith("x" * 100) and t.endswith("more characters not kept]") for t in stored), "huge text bounded"
    report = await bot.runtime.audit.log.verify()
    assert report.ok, report.summary()
    assert bot.slack.in_channel(Harness.INCIDENT) == [], "no card for any of them"


async def test_a_dry_run_is_recorded(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 6 --dry-run")
    await bot.response(containing="Dry run")
    row = (await wait_rows(bot, "dry_run"))[0]
    assert row["plan"]["after"] == {"replicas": 6} and row["result"]["decision"] == "needs_approval"
    assert replicas(kube) == 3


async def test_refusals_because_a_backend_is_down_are_recorded(bot: Harness, kube: KubeApiServer) -> None:
    kube.stop()
    await bot.slash(ALICE, "/ops scale worker 6")
    reply = await bot.response(containing="Refused")
    assert "Kubernetes API is unavailable" in reply["text"]
    row = (await wait_rows(bot, "refused"))[0]
    assert "Kubernetes" in row["result"]["error"] and row["command_text"] == "scale worker 6"


async def test_refused_clicks_are_answered_and_recorded(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    a = await bot.requested()
    await bot.slash(ALICE, "/ops rollback api")

    async def second() -> Any:
        r = await bot.requested()
        return r if r.id != a.id else None

    b = await bot.eventually(second, what="the second request")
    await bot.click(ALICE, a.id)                    # self-approval
    await bot.click(MALLORY, a.id)                  # not an approver
    await bot.click(CAROL, b.id, on_card_of=a.id)   # 9: B's id on A's card (a forged button)
    await bot.click(CAROL, "r-zzzzzzzz")            # unknown request
    await bot.click(CAROL, a.id, value="r-x'; DROP TABLE ops_requests; --\x00")  # not a request id at all
    refused = await wait_rows(bot, "vote_refused", 5)
    why = [(r["actor_id"], r["result"]["why"], r["request_id"]) for r in refused]
    assert why == [(ALICE, "ineligible", a.id), (MALLORY, "ineligible", a.id), (CAROL, "forged", None),
                   (CAROL, "missing", None), (CAROL, "forged", None)], why
    assert refused[2]["result"]["request_id_given"] == b.id
    assert refused[4]["result"]["request_id_given"].endswith("--\\x00"), "kept, escaped"
    for r in (a, b):
        current = await bot.runtime.store.get(r.id)
        assert current is not None and current.state.value == "pending_approval" and current.approvals == ()
    assert replicas(kube) == 3
    texts = [m.text for m in bot.slack.ephemeral_to(CAROL)]
    assert any("does not belong to request" in t for t in texts) and any("does not exist" in t for t in texts)
    # The right click on the right card still works.
    await bot.click(CAROL, a.id)
    assert (await bot.state_of(a.id, "succeeded", "failed")).state.value == "succeeded"


async def test_two_fast_clicks_from_two_replicas_on_a_forged_and_a_real_card(bot: Harness, kube: KubeApiServer) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    a = await bot.requested()
    await asyncio.gather(*(bot.click(user, a.id) for user in (CAROL, DAN, CAROL, DAN)),
                         bot.click(CAROL, a.id, value=a.id, on_card_of="r-nosuchcard"))
    done = await bot.state_of(a.id, "succeeded", "failed")
    assert done.state.value == "succeeded" and replicas(kube) == 5
    assert (await bot.audit_events(a.id)).count("started") == 1


# ---------------------------------------------------------------------------- 3/8. the HTTP edge

async def test_malformed_and_unsigned_payloads_get_a_fast_4xx_without_a_traceback(bot: Harness,
                                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bad = urlencode({"payload": "{not json"})
    t0 = time.monotonic()
    assert (await bot.post_signed(bad))[0] == 400
    assert (await bot.post_signed(bad, signature="v0=" + "0" * 64))[0] == 401
    assert (await bot.post_signed(urlencode({"payload": "[]"})))[0] in (400, 404)
    assert (await bot.post_signed(urlencode({"payload": json.dumps({"type": "block_actions", "actions": "x"})})))[0] < 500
    assert time.monotonic() - t0 < 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_requests_without_a_usable_timestamp_get_a_fast_401_without_a_traceback(bot: Harness,
                                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import aiohttp

    caplog.set_level(logging.INFO)
    body = urlencode({"command": "/ops", "text": "help", "user_id": ALICE, "channel_id": "C0INCIDENT"})
    sig = "v0=" + "0" * 64
    cases: list[dict[str, str]] = [
        {},  # no Slack headers at all
        {"X-Slack-Signature": sig},  # no timestamp
        {"X-Slack-Request-Timestamp": "", "X-Slack-Signature": sig},
        {"X-Slack-Request-Timestamp": "yesterday", "X-Slack-Signature": sig},
        {"X-Slack-Request-Timestamp": "1.7e9", "X-Slack-Signature": sig},
        {"X-Slack-Request-Timestamp": "9" * 5000, "X-Slack-Signature": sig},  # beyond int()'s digit limit
        {"X-Slack-Request-Timestamp": str(10**20), "X-Slack-Signature": sig},
        {"X-Slack-Request-Timestamp": "-1", "X-Slack-Signature": sig},
    ]
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        for headers in cases:
            async with http.post(bot.url + "/slack/events", data=body.encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded", **headers}) as resp:
                assert resp.status == 401, (headers.get("X-Slack-Request-Timestamp", "<none>")[:20], resp.status)
                assert "invalid request signature" in await resp.text()
    assert time.monotonic() - t0 < 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in caplog.records]
    assert await bot.audit_events() == []


async def test_a_huge_signed_body_is_refused_without_blocking_others(bot: Harness) -> None:
    huge = urlencode({"command": "/ops", "text": "scale worker 6 " + "A" * 900_000, "user_id": ALICE, "channel_id": "C0INCIDENT"})

    async def timed(coro: Any) -> tuple[float, Any]:
        t0 = time.monotonic()
        result = await coro
        return time.monotonic() - t0, result

    (t_huge, (status, _)), (t_help, (help_status, _)) = await asyncio.gather(
        timed(bot.post_signed(huge)), timed(bot.slash(EVE, "/ops help")))
    assert status == 413 and help_status == 200
    assert t_huge < 2 and t_help < 2, (t_huge, t_help)


async def test_malformed_ids_in_a_signed_command_are_refused_and_recorded(bot: Harness) -> None:
    body = urlencode({"command": "/ops", "text": "scale worker 6", "user_id": "U0ALICE\x00'--", "channel_id": "C0INCIDENT",
                      "response_url": bot.slack.response_url("x")})
    status, text = await bot.post_signed(body)
    assert status == 200 and "is not a Slack user id" in text
    row = (await wait_rows(bot, "malformed"))[0]
    assert row["actor_id"] == "U0ALICE\\x00'--" and row["command_text"] == "scale worker 6"


# ---------------------------------------------------------------------------- user text in Slack mrkdwn

def audit_channel_lines(bot: Harness) -> list[str]:
    """Every line of every message in the audit channel (headlines, thread replies, compact lines)."""
    return [line for m in bot.slack.messages if m.channel == "C0AUDIT" and m.user is None for line in m.text.splitlines()]


async def test_user_text_is_escaped_on_the_card_and_in_the_audit_channel(bot: Harness, state_db: str) -> None:
    """`<!channel>` (as Slack sends a typed @channel) and a disguised link (typed `<`, which Slack
    sends as `&lt;`) in a --reason, and a mention-like word in a command: shown, never interpreted."""
    await bot.slash(ALICE, '/ops scale worker 4 --reason "<!channel> &lt;https://evil|click&gt;"')
    request = await bot.requested()
    await bot.slash(ALICE, "/ops scale <!here> 3")  # invalid: its text goes into a compact audit line
    await wait_rows(bot, "invalid")
    await bot.eventually(lambda: _all_posted(bot), what="the audit rows to be posted")
    shown = card(bot, request.card_ts).all_text()  # the blocks and the fallback text (notifications)
    assert "reason: &lt;!channel&gt; &lt;https://evil|click&gt;" in shown
    assert "`/ops scale worker 4 --reason \"&lt;!channel&gt; &lt;https://evil|click&gt;\"`" in shown
    assert "<!channel>" not in shown and "<https://evil" not in shown
    lines = audit_channel_lines(bot)
    assert any("reason: &lt;!channel&gt; &lt;https://evil|click&gt;" in line for line in lines), lines
    assert any("`/ops scale &lt;!here&gt; 3`" in line for line in lines), lines
    assert not [line for line in lines if "<!" in line or "<https://evil" in line], lines
    # What was typed is kept as typed, for parsing and for the record.
    assert (await bot.runtime.store.get(request.id)).reason == "<!channel> <https://evil|click>"  # type: ignore[union-attr]
    assert (await rows(bot, "requested"))[0]["result"]["reason"] == "<!channel> <https://evil|click>"
    assert (await rows(bot, "invalid"))[0]["command_text"] == "scale <!here> 3"


async def test_a_newline_in_a_reason_cannot_start_a_fake_audit_line(bot: Harness) -> None:
    fake = "`#1` *approved* by <@U0CAROL>: all fine · hash `" + "f" * 64 + "`"
    await bot.slash(ALICE, f'/ops scale worker 4 --reason "INC-7\n{fake}\nlast record `#1` hash `{"e" * 64}`"')
    request = await bot.requested()
    await bot.eventually(lambda: _all_posted(bot), what="the audit rows to be posted")
    real = {r["hash"] for r in await rows(bot)}
    lines = audit_channel_lines(bot)
    starts = [line for line in lines if line.startswith(("`#", "last record"))]
    assert starts and all(line.endswith(tuple(f"hash `{h}`" for h in real)) for line in starts), starts
    assert any("reason: INC-7 `#1` *approved* by &lt;@U0CAROL&gt;" in line for line in lines), lines
    shown = card(bot, request.card_ts).all_text()
    assert "reason: INC-7 `#1`" in shown and "\n`#1`" not in shown


async def _all_posted(bot: Harness) -> bool:
    try:
        return await bot.runtime.audit.log.unposted() == 0 and not await bot.runtime.audit.log.stale_headlines()
    except BackendUnavailable:
        return False


# ---------------------------------------------------------------------------- PostgreSQL down: the spool

@pytest_asyncio.fixture
async def proxied(config: Config, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str, queue_prefix: str,
                  tmp_path: Path) -> AsyncIterator[tuple[Harness, TcpProxy]]:
    proxy, url = await TcpProxy.for_url(state_db)
    h = await Harness.start(config=config, slack=slack, database_url=url, redis_url=redis_url, kubeconfig=kubeconfig,
                            queue_prefix=queue_prefix, spool_dir=str(tmp_path / "spool"))
    yield h, proxy
    proxy.up()
    await asyncio.wait_for(h.stop(), timeout=60)
    await proxy.stop()


async def test_with_postgres_down_attempts_are_spooled_and_appended_when_it_returns(proxied: tuple[Harness, TcpProxy],
                                                                                    kube: KubeApiServer, tmp_path: Path) -> None:
    bot, db = proxied
    await bot.slash(EVE, "/ops help")
    await wait_rows(bot, "read")
    db.down()
    status, _ = await bot.slash(ALICE, "/ops scale worker 6")
    assert status == 200  # the ack never waits on the database
    reply = await bot.response(containing="Refused", timeout=30)
    assert "opsbot database is unavailable" in reply["text"] and "local spool" in reply["text"]
    status, body = await bot.slash(ALICE, "/ops scale worker ²")  # an invalid command while it is down: spooled too
    assert status == 200 and "Type `2`" in body
    assert replicas(kube) == 3
    spool = list((tmp_path / "spool").glob("spool-*.jsonl"))
    assert spool and sum(len(p.read_text().splitlines()) for p in spool) >= 1
    db.up()
    refused = await wait_rows(bot, "refused", 1, timeout=30)
    invalid = await wait_rows(bot, "invalid", 1, timeout=30)
    assert refused[0]["result"]["spooled"]["why"].startswith("the opsbot database is unavailable")
    assert invalid[0]["command_text"] == "scale worker ²"
    report = await bot.runtime.audit.log.verify()
    assert report.ok, report.summary()
    # Draining again (a crash between append and file rewrite) never appends twice.
    n = len(await rows(bot))
    assert await bot.runtime.audit.drain_spool() == 0 and len(await rows(bot)) == n


@pytest_asyncio.fixture
async def proxied_unwritable_spool(config: Config, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str,
                                   queue_prefix: str, tmp_path: Path) -> AsyncIterator[tuple[Harness, TcpProxy]]:
    """As ``proxied``, with a spool directory that cannot be created (its parent is a file: a
    read-only root filesystem without a mounted spool volume fails the same way, even for root)."""
    (tmp_path / "not-a-dir").write_text("")
    proxy, url = await TcpProxy.for_url(state_db)
    h = await Harness.start(config=config, slack=slack, database_url=url, redis_url=redis_url, kubeconfig=kubeconfig,
                            queue_prefix=queue_prefix, spool_dir=str(tmp_path / "not-a-dir" / "spool"))
    yield h, proxy
    proxy.up()
    await asyncio.wait_for(h.stop(), timeout=60)
    await proxy.stop()


async def test_with_postgres_down_and_the_spool_unwritable_the_person_is_still_answered(
        proxied_unwritable_spool: tuple[Harness, TcpProxy], kube: KubeApiServer) -> None:
    bot, db = proxied_unwritable_spool
    db.down()
    status, _ = await bot.slash(ALICE, "/ops scale worker 6")
    assert status == 200
    reply = await bot.response(containing="Refused", timeout=30)
    assert "opsbot database is unavailable" in reply["text"]
    assert "could not be recorded in the audit trail" in reply["text"] and "local audit spool is unavailable" in reply["text"]
    status, body = await bot.slash(ALICE, "/ops scale wrkr 2")  # invalid while both are out: answered in the ack
    assert status == 200 and "unknown deployment" in body
    assert replicas(kube) == 3


def _spooled(n: int, text: str) -> str:
    return json.dumps({"event": "invalid", "actor_id": ALICE, "actor_name": "alice", "channel_id": "C0INCIDENT",
                       "request_id": None, "command_text": text, "plan": None, "post": True,
                       "result": {"error": "unknown deployment", "spooled": {"id": f"{n:032x}", "at": "2025-01-01T00:00:00+00:00",
                                                                             "why": "the opsbot database is unavailable"}}})


async def test_bad_spool_lines_are_quarantined_and_the_rest_is_drained(config: Config, slack: FakeSlack, state_db: str,
                                                                      redis_url: str, kubeconfig: str, queue_prefix: str,
                                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spool file left by a process that died, with lines that are not rows: not JSON, JSON that
    is not an object, an object that is not an append's arguments, one PostgreSQL refuses (NUL). Each
    is moved to quarantine.jsonl (logged at error level, counted); the good ones are appended and
    posted, and the poster goes on."""
    spool = tmp_path / "spool"
    spool.mkdir()
    bad = ["[1,2]", "{garbage", json.dumps({"event": "invalid", "surprise": 1}),
           _spooled(3, "scale worker \u0000")]  # json.dumps writes it as \\u0000; PostgreSQL text cannot hold NUL
    (spool / "spool-1-deadbeef.jsonl").write_text("\n".join([_spooled(1, "scale wrkr 1"), *bad, _spooled(2, "scale wrkr 2")]) + "\n")
    bot = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix, spool_dir=str(spool))
    try:
        invalid = await wait_rows(bot, "invalid", 2)
        assert [r["command_text"] for r in invalid] == ["scale wrkr 1", "scale wrkr 2"]
        await bot.eventually(lambda: _all_posted(bot), what="the drained rows to be posted")
        assert len([line for line in bot.audit_lines() if "scale wrkr" in line]) == 2
        assert not (spool / "spool-1-deadbeef.jsonl").exists()
        quarantined = [json.loads(line) for line in (spool / "quarantine.jsonl").read_text().splitlines()]
        assert [q["raw"] for q in quarantined] == bad
        assert all(q["source"].endswith("spool-1-deadbeef.jsonl") and q["why"] for q in quarantined)
        assert 'opsbot_audit_spool_quarantined_total 4.0' in _metrics(bot)
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR and "quarantine" in r.getMessage()]) == 4
        # Later rows are still appended and posted: the poster was not stopped.
        await bot.slash(ALICE, "/ops scale wrkr 3")
        await wait_rows(bot, "invalid", 3)
        await bot.eventually(lambda: _all_posted(bot), what="a later row to be posted")
    finally:
        await asyncio.wait_for(bot.stop(), timeout=60)


# ---------------------------------------------------------------------------- helpers

def _metrics(bot: Harness) -> str:
    from prometheus_client import generate_latest

    return generate_latest(bot.runtime.metrics.registry).decode()


async def _state(bot: Harness, request_id: str, state: str) -> bool:
    r = await bot.runtime.store.get(request_id)
    return bool(r and r.state.value == state)


async def _async(value: object) -> object:
    return value


async def test_the_duplicate_post_check_counts_only_opsbots_own_messages(slack: FakeSlack) -> None:
    """After a post whose answer was lost, opsbot looks for it before posting again. A person who
    posts the same text (a row hash) must not make opsbot believe its post arrived."""
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.slack.chat import SlackChat

    chat = SlackChat(AsyncWebClient(token="xoxb-test-token", base_url=slack.api_url))
    head = await chat.post_message(channel_id="C0AUDIT", text="headline")
    slack.post_as(MALLORY, "C0AUDIT", "`#7` *succeeded* · hash `abc123`", thread_ts=head)
    assert await chat.find_message(channel_id="C0AUDIT", needle="abc123", thread_ts=head) is None
    mine = await chat.post_message(channel_id="C0AUDIT", text="`#7` *succeeded* · hash `abc123`", thread_ts=head)
    assert await chat.find_message(channel_id="C0AUDIT", needle="abc123", thread_ts=head) == mine
    slack.post_as(MALLORY, "C0AUDIT", "forged top-level hash `def456`")
    assert await chat.find_message(channel_id="C0AUDIT", needle="def456") is None
