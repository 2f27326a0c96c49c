"""The audit channel as auditors read it: the outbox catches up after a Slack outage without posting
anything twice, attempts that never became requests get one compact line, `/ops audit` answers
auditors only, and `opsbot audit verify --against-channel` compares the channel with the database."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from typing import Any

import psycopg

from tests.conftest import ALICE, CAROL, EVE, EXAMPLE, MALLORY
from tests.harness import Harness


def hashes_in_channel(bot: Harness, channel: str = "C0AUDIT") -> list[str]:
    return [h for m in bot.slack.messages if m.channel == channel for h in re.findall(r"hash `([0-9a-f]{64})`", m.text)
            if "last record" not in m.text]


async def all_posted(bot: Harness) -> bool:
    return await bot.runtime.audit.log.unposted() == 0


async def test_outbox_catches_up_after_an_outage_without_duplicates(bot: Harness, state_db: str) -> None:
    await bot.slash(ALICE, "/ops scale worker 5")
    request = await bot.requested()
    await bot.eventually(lambda: all_posted(bot), what="the first row to be posted")
    bot.slack.down = True  # the Web API goes away; clicks still arrive (Slack's edge is a different system)
    await bot.click(CAROL, request.id)
    done = await bot.eventually(lambda: _final(bot, request.id), what="the request to finish")
    assert done.state.value == "succeeded"  # the action does not wait for the audit channel
    await bot.eventually(lambda: _events_at_least(bot, 5), what="audit rows")
    await asyncio.sleep(0.6)  # a few poster rounds fail meanwhile
    assert len(hashes_in_channel(bot)) == 1, "only what was posted before the outage"
    with psycopg.connect(state_db) as conn:
        attempts = conn.execute("SELECT max(attempts) FROM audit_outbox").fetchone()
    assert attempts is not None and attempts[0] >= 1
    bot.slack.down = False
    with psycopg.connect(state_db, autocommit=True) as conn:  # skip the back-off wait
        conn.execute("UPDATE audit_outbox SET next_attempt_at = now()")
    await bot.eventually(lambda: all_posted(bot), what="the outbox to drain")
    rows = await bot.runtime.audit.log.rows()
    posted = hashes_in_channel(bot)
    assert sorted(posted) == sorted(r["hash"] for r in rows) and len(posted) == len(set(posted)), "each row exactly once"
    heads = [m for m in bot.slack.in_channel("C0AUDIT") if request.id in m.text]
    # The backlog goes out batched: one reply may carry several rows, one audit line each.
    thread = bot.slack.thread("C0AUDIT", heads[0].ts)
    assert len(heads) == 1 and sum(len(m.text.splitlines()) for m in thread) == len(rows)
    assert len(thread) < len(rows), "the rows kept during the outage went out together"


async def test_a_post_whose_answer_was_lost_is_not_posted_again(bot: Harness) -> None:
    bot.runtime.chat.client.timeout = 1
    bot.slack.slow_methods["chat.postMessage"] = 2.0  # Slack posts it, but answers after our timeout
    await bot.slash(MALLORY, "/ops scale worker 5")
    await bot.eventually(lambda: _events_at_least(bot, 1), what="the audit row")
    await bot.eventually(lambda: _uncertain(bot), what="an uncertain attempt", timeout=15)
    bot.slack.slow_methods.clear()
    with_id = (await bot.runtime.audit.log.rows())[0]
    await bot.runtime.poster.run_once()  # finds the earlier post by its hash instead of posting again
    await bot.eventually(lambda: all_posted(bot), what="the outbox to drain")
    assert hashes_in_channel(bot).count(with_id["hash"]) == 1


async def test_invalid_and_denied_attempts_are_one_line_each(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale wrkr 3")
    await bot.eventually(lambda: _events_at_least(bot, 1), what="the first audit row")  # recorded after the ack
    await bot.slash(MALLORY, "/ops rollback api")
    await bot.eventually(lambda: _events_at_least(bot, 2), what="audit rows")
    await bot.eventually(lambda: all_posted(bot), what="the outbox to drain")
    # One line each (two rows due at once may share one message, a line each).
    lines = [line for m in bot.slack.in_channel("C0AUDIT") for line in m.text.splitlines()]
    assert len(lines) == 2
    assert "*invalid command* by <@U0ALICE> in <#C0INCIDENT>: `/ops scale wrkr 3`" in lines[0]
    assert "unknown deployment `wrkr`" in lines[0]
    assert "*denied by policy* by <@U0MALLORY>" in lines[1] and "you may not run `rollback`" in lines[1]


async def test_ops_audit_is_for_auditors(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale worker 4")
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    await bot.state_of(request.id, "succeeded")
    await bot.slash(MALLORY, "/ops rollback api")
    await bot.response(containing="Not allowed")

    await bot.slash(ALICE, "/ops audit")
    assert "your roles: engineer" in (await bot.response(containing="you may not run `audit`"))["text"]
    await bot.slash(EVE, "/ops audit --command scale --outcome succeeded --since 1h")
    reply = await bot.response(containing="audit row")
    assert reply["response_type"] == "ephemeral"
    assert "*1 audit row matches*" in reply["text"] and "*succeeded*" in reply["text"] and request.id in reply["text"]
    await bot.slash(EVE, "/ops audit --user <@U0MALLORY|mallory>")
    reply = await bot.response(containing="policy_denied")
    assert "*1 audit row matches*" in reply["text"]
    await bot.slash(EVE, "/ops audit --target worker")
    # requested, approval_given, approved, started, succeeded, followed; the denied attempt names no plan target
    reply = await bot.response(containing="*6 audit rows match* — page 1 of 1")
    assert "policy_denied" not in reply["text"]
    assert "*started* opsbot: " in reply["text"] and "<@opsbot>" not in reply["text"]  # the worker's rows: opsbot, not a mention
    _, ack = await bot.slash(EVE, "/ops audit --since yesterday")
    assert "neither a duration (7d, 12h, 30m) nor a date" in ack


async def test_verify_against_the_channel(bot: Harness, state_db: str, platform_db: str, redis_url: str) -> None:
    await _seven_posted_rows(bot)
    env = _verify_env(bot, state_db, platform_db, redis_url)
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "database: OK: 7 rows" in proc.stdout and "channel: 7 posted hashes compared, 0 differ" in proc.stdout
    # Rewrite a row and its hash (and all that follow) so the database chain is valid again: only the
    # channel, posted at the time, still shows what really happened.
    await _rewrite_from_seq3(bot, state_db)
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert proc.returncode == 1
    assert "database: OK" in proc.stdout
    assert "channel: BROKEN: the database differs from what was posted at seq 3, 4, 5, 6, 7" in proc.stdout


def _verify_env(bot: Harness, state_db: str, platform_db: str, redis_url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": state_db, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": "x",
            "SLACK_API_URL": bot.slack.api_url, "REDIS_URL": redis_url, "OPSBOT_CONFIG": str(EXAMPLE),
            "NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url}


async def _opsbot(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "bot", *args], capture_output=True, text=True,
                                   env=env, timeout=60)


async def _seven_posted_rows(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops scale worker 4")
    request = await bot.requested()
    await bot.click(CAROL, request.id)
    await bot.state_of(request.id, "succeeded")
    await bot.slash(MALLORY, "/ops scale worker 9")
    await bot.eventually(lambda: _events_at_least(bot, 7), what="audit rows")
    await bot.eventually(lambda: all_posted(bot), what="the outbox to drain")


async def test_verify_against_the_channel_fails_when_the_newest_rows_were_deleted(bot: Harness, state_db: str,
                                                                                  platform_db: str, redis_url: str) -> None:
    """Cutting the tail off leaves a shorter chain that verifies on its own; the channel still has
    the rows, so `verify --against-channel` must exit 1 and name them."""
    await _seven_posted_rows(bot)
    with psycopg.connect(state_db, autocommit=True) as conn:  # the owner, trigger off
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        conn.execute("DELETE FROM audit_outbox WHERE seq >= 5")
        conn.execute("DELETE FROM audit_events WHERE seq >= 5")
    proc = await _opsbot(_verify_env(bot, state_db, platform_db, redis_url), "audit", "verify", "--against-channel")
    assert "database: OK: 4 rows" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "channel: MISSING: 3 posted rows are not in the database and no pruning checkpoint covers them: seq 5, 6, 7" \
        in proc.stdout, proc.stdout


async def test_verify_against_the_channel_accepts_pruned_rows(bot: Harness, state_db: str, platform_db: str,
                                                             redis_url: str) -> None:
    await _seven_posted_rows(bot)
    env = _verify_env(bot, state_db, platform_db, redis_url)
    pruned = await _opsbot(env, "audit", "prune", "--before", "2999-01-01")
    assert "pruned 6 rows up to seq 6" in pruned.stdout, pruned.stdout + pruned.stderr
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "channel: 6 posted rows pruned (covered by the checkpoint up to seq 6)" in proc.stdout, proc.stdout


async def test_verify_against_the_channel_ignores_lines_people_post(bot: Harness, state_db: str, platform_db: str,
                                                                   redis_url: str) -> None:
    """Anyone in the audit channel can post a `#N … hash …` line. The owner rewrites rows 3-6 (a
    valid chain again) and posts the new hashes as replies in the request's audit thread, after the
    bot's: only the bot's own messages count, so the rewrite still shows, and the forgery is reported."""
    await _seven_posted_rows(bot)
    rows = await _rewrite_from_seq3(bot, state_db)
    head = next(m for m in bot.slack.in_channel("C0AUDIT") if rows[0]["request_id"] in m.text)
    for row in rows[2:]:
        if row["request_id"] == rows[0]["request_id"]:
            bot.slack.post_as(MALLORY, "C0AUDIT", f"`#{row['seq']}` *approved* by <@U0CAROL>: · hash `{row['hash']}`",
                              thread_ts=head.ts)
    bot.slack.post_as(MALLORY, "C0AUDIT", "`#99` *succeeded* by opsbot: scale · hash `" + "0" * 64 + "`")
    proc = await _opsbot(_verify_env(bot, state_db, platform_db, redis_url), "audit", "verify", "--against-channel")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "channel: BROKEN: the database differs from what was posted at seq 3, 4, 5, 6, 7" in proc.stdout, proc.stdout
    assert "MISSING" not in proc.stdout, proc.stdout  # the forged #99 is not taken for a deleted row
    assert "channel: ignored 5 messages with audit lines not posted by opsbot (U0BOT): from U0MALLORY (5)" in proc.stdout, \
        proc.stdout


async def _rewrite_from_seq3(bot: Harness, state_db: str) -> list[dict[str, Any]]:
    """As the table's owner (trigger off): change row 3's actor and recompute every hash from there,
    so the database chain verifies again. Returns the rows as rewritten."""
    from bot.adapters.audit_log import audit_hash, audit_record

    rows = await bot.runtime.audit.log.rows()
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        prev = rows[2]["prev_hash"]
        for row in rows[2:]:
            if row["seq"] == 3:
                row["actor_id"] = "U0SOMEONEELSE"
            row["prev_hash"], row["hash"] = prev, audit_hash(prev, audit_record(row))
            conn.execute("UPDATE audit_events SET actor_id = %s, prev_hash = %s, hash = %s, canon = NULL WHERE seq = %s",
                         (row["actor_id"], row["prev_hash"], row["hash"], row["seq"]))
            prev = row["hash"]
    return list(rows)


async def _final(bot: Harness, request_id: str):  # type: ignore[no-untyped-def]
    r = await bot.runtime.store.get(request_id)
    return r if r is not None and r.state.final else None


async def _events_at_least(bot: Harness, n: int) -> bool:
    return len(await bot.audit_events()) >= n


async def _uncertain(bot: Harness) -> bool:
    async with bot.runtime.store.connection() as conn:
        row = await (await conn.execute("SELECT bool_or(uncertain) AS u FROM audit_outbox")).fetchone()
    return bool(row and row["u"])


async def test_a_backlog_drains_in_few_messages_at_slacks_pace(bot: Harness, state_db: str, platform_db: str,
                                                               redis_url: str) -> None:
    # A backlog builds up while the poster is held off (another replica's lock): two requests and
    # three attempts that never became one.
    async with bot.runtime.audit.log.store.target_lock(f"audit-outbox-{0x0A0D18}", wait=10) as held:
        assert held
        await bot.slash(ALICE, "/ops scale worker 5")
        first = await bot.requested()
        await bot.slash(ALICE, "/ops scale api 4")
        await bot.eventually(lambda: _events_at_least(bot, 2), what="audit rows")
        second = await bot.requested()
        for text in ("/ops scale wrkr 3", "/ops scale", "/ops rollback api"):
            await bot.slash(MALLORY, text)
        await bot.eventually(lambda: _events_at_least(bot, 5), what="audit rows")
        requests = [first, second]
        assert first.id != second.id and hashes_in_channel(bot) == []
        # Slack at its pace: past one message per 2 s in a channel it answers 429 with Retry-After.
        bot.slack.channel_rate = {"chat.postMessage": (0.5, 1), "chat.update": (0.5, 1)}
    bot.runtime.audit.appended.set()
    await bot.eventually(lambda: all_posted(bot), what="the backlog to drain", timeout=40)
    rows = await bot.runtime.audit.log.rows()
    posted = hashes_in_channel(bot)
    assert sorted(posted) == sorted(r["hash"] for r in rows) and len(posted) == len(set(posted)), "each row exactly once"
    assert bot.slack.throttled >= 1, "Slack said to wait at least once"
    with psycopg.connect(state_db) as conn:  # each 429 (Retry-After 2 s) waited out within the round, not a failed try
        assert conn.execute("SELECT max(attempts), count(*) FILTER (WHERE last_error IS NOT NULL) FROM audit_outbox").fetchone() == (0, 0)
    audit_posts = [a for a in bot.slack.calls_to("chat.postMessage") if a["channel"] == "C0AUDIT"]
    assert len(audit_posts) - bot.slack.throttled <= 3 < len(rows)  # lines of their own, one shared headline, its thread
    shared = [m for m in bot.slack.in_channel("C0AUDIT") if all(f"`{r.id}`" in m.text for r in requests)]
    assert len(shared) == 1 and shared[0].text.count("last record `#") == 2
    # Each approval card links to its record; the links were built, not asked for one by one.
    for r in requests:
        again = await bot.runtime.store.get(r.id)
        assert again is not None and again.audit_permalink and again.audit_permalink.endswith(shared[0].ts.replace(".", ""))
    assert len([a for a in bot.slack.calls_to("chat.getPermalink") if a["channel"] == "C0AUDIT"]) <= 1
    proc = await _opsbot(_verify_env(bot, state_db, platform_db, redis_url), "audit", "verify", "--against-channel")
    assert proc.returncode == 0 and f"channel: {len(rows)} posted hashes compared, 0 differ" in proc.stdout, proc.stdout


async def test_permalinks_are_learned_once_and_built_after() -> None:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.audit import Permalinks
    from bot.sandbox.slack_api import FakeSlack
    from bot.slack.chat import SlackChat

    slack = await FakeSlack().start()
    try:
        slack.permalink_base = "https://acme.slack.com"
        links = Permalinks(SlackChat(AsyncWebClient(token="xoxb-test-token", base_url=slack.api_url)))
        slack.fail_methods["chat.getPermalink"] = "channel_not_found"
        assert await links.get("C1", "1700000001.000100") is None  # not remembered: asked again next time
        slack.fail_methods.clear()
        got = [await links.get(c, ts) for c, ts in (("C1", "1700000001.000100"), ("C2", "1700000002.000200"),
                                                      ("C1", "1700000003.000300"))]
        assert got == ["https://acme.slack.com/archives/C1/p1700000001000100", "https://acme.slack.com/archives/C2/p1700000002000200",
                       "https://acme.slack.com/archives/C1/p1700000003000300"]
        assert len(slack.calls_to("chat.getPermalink")) == 2  # the failed one, then one that taught the workspace URL
    finally:
        await slack.stop()


async def test_a_big_backlog_goes_out_in_messages_of_up_to_38k_characters(bot: Harness, state_db: str, platform_db: str,
                                                                          redis_url: str) -> None:
    """What lets the channel keep up with a sustained load at Slack's ~1 message/s: many lines per
    message (up to 38,000 characters, under Slack's 40,000), up to 150 new requests per shared
    headline and, under a backlog, one line per request listing its rows (each row's seq and hash
    prefix, the last one's full hash). Each row is in the channel once, and the channel verifies."""
    from bot.domain import Actor, RequestState, UserId
    from bot.messages import audit_request_line, posted_hashes

    n = 80
    async with bot.runtime.audit.log.store.target_lock(f"audit-outbox-{0x0A0D18}", wait=10) as held:
        assert held  # the poster is held off while the backlog builds up
        for i in range(n):
            request_id = f"r-big{i:04d}"
            plan = {"command": "scale", "target": f"deployment/nova/svc-{i}", "target_label": f"svc-{i}",
                    "environment": "production", "summary": f"svc-{i}: 3 → 4 replicas", "fingerprint": f"fp-{i}", "params": {}}
            await bot.runtime.store.create_request(
                id=request_id, command="scale", text=f"scale svc-{i} 4", requester=Actor(UserId(ALICE), "alice"),
                channel_id="C0INCIDENT", plan=plan, reason="incident", state=RequestState.SUCCEEDED, approvals_required=1,
                approver_roles=("sre",), rule=None, expires_in=3600)
            for event in ("requested", "approved", "started", "succeeded"):
                await bot.runtime.audit.record(event, actor=Actor(UserId(ALICE), "alice"), channel_id="C0INCIDENT",
                                               request_id=request_id, text=f"scale svc-{i} 4",
                                               plan={"summary": f"svc-{i}: 3 → 4 replicas", "environment": "production"},
                                               result={"message": "scaled <!channel> & done"} if event == "succeeded" else None)
    bot.runtime.audit.appended.set()
    await bot.eventually(lambda: all_posted(bot), what="the backlog to drain", timeout=60)
    rows = await bot.runtime.audit.log.rows()
    assert len(rows) == 4 * n
    posts = [m for m in bot.slack.messages if m.channel == "C0AUDIT"]  # headlines and thread replies
    lines = [line for m in posts for line in m.text.splitlines() if line.startswith("`#")]
    by_seq = {r["seq"]: r for r in rows}
    shown = [seq for line in lines for seq, _ in posted_hashes(line)]
    assert sorted(shown) == sorted(by_seq), "each row once"
    for line in lines:  # one line per request, exactly as audit_request_line writes its rows
        assert line == audit_request_line([by_seq[seq] for seq, _ in posted_hashes(line)])
    assert len(lines) == n and all("&lt;!channel&gt; &amp; done" in line for line in lines)
    assert all(len(m.text) <= 38_000 for m in posts)
    headlines = [m for m in posts if "last record `#" in m.text]
    assert [m.text.count("last record `#") for m in headlines] == [n]  # before: 40 per message, 2 messages
    replies = [m for m in posts if m.thread_ts]
    assert len(replies) == 1 and len(replies[0].text) < 4 * n * 200 // 2  # before: 2 replies of 160 full lines (~64k chars)
    proc = await _opsbot(_verify_env(bot, state_db, platform_db, redis_url), "audit", "verify", "--against-channel")
    assert proc.returncode == 0 and f"channel: {len(rows)} posted hashes compared, 0 differ" in proc.stdout, proc.stdout


async def _compact_backlog(bot: Harness, n: int = 60) -> list[dict[str, Any]]:
    """``n`` requests of 4 rows each, written while the poster is held off (another replica's lock),
    then posted: more than one message of full lines, so one line per request
    (``audit_request_line``)."""
    from bot.domain import Actor, RequestState, UserId

    async with bot.runtime.audit.log.store.target_lock(f"audit-outbox-{0x0A0D18}", wait=10) as held:
        assert held
        for i in range(n):
            request_id = f"r-cmp{i:04d}"
            plan = {"command": "scale", "target": f"deployment/nova/svc-{i}", "target_label": f"svc-{i}",
                    "environment": "production", "summary": f"svc-{i}: 3 → 4 replicas", "fingerprint": f"fp-{i}", "params": {}}
            await bot.runtime.store.create_request(
                id=request_id, command="scale", text=f"scale svc-{i} 4", requester=Actor(UserId(ALICE), "alice"),
                channel_id="C0INCIDENT", plan=plan, reason="incident", state=RequestState.SUCCEEDED, approvals_required=1,
                approver_roles=("sre",), rule=None, expires_in=3600)
            for event in ("requested", "approved", "started", "succeeded"):
                await bot.runtime.audit.record(event, actor=Actor(UserId(CAROL if event == "approved" else "opsbot"), ""),
                                               channel_id="C0INCIDENT", request_id=request_id, text=f"scale svc-{i} 4",
                                               plan={"summary": f"svc-{i}: 3 → 4 replicas", "environment": "production"},
                                               result={"message": "scaled"} if event == "succeeded" else None)
    bot.runtime.audit.appended.set()
    await bot.eventually(lambda: all_posted(bot), what="the backlog to drain", timeout=60)
    lines = [line for m in bot.slack.messages if m.channel == "C0AUDIT" for line in m.text.splitlines() if line.startswith("`#")]
    assert len(lines) == n and all(line.startswith("`#") and ":" in line.split(" ")[0] for line in lines), lines[:3]
    return list(await bot.runtime.audit.log.rows())


async def test_verify_against_a_compact_channel_finds_an_altered_row_by_its_prefix(bot: Harness, state_db: str,
                                                                                   platform_db: str, redis_url: str) -> None:
    """Row 3 is in the channel only as `#3:<first 16 digits of its hash>` (the line of request 1's
    rows ends with row 4's full hash). Changing row 3 and its hash alone is seen at seq 3, and
    rewriting the chain from there (a valid chain again) at 3 and every row after."""
    from bot.adapters.audit_log import audit_hash, audit_record

    rows = await _compact_backlog(bot)
    env = _verify_env(bot, state_db, platform_db, redis_url)
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"channel: {len(rows)} posted hashes compared, 0 differ, 0 missing; 0 rows not (yet) posted" in proc.stdout, proc.stdout
    third = rows[2]
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        third["actor_id"] = "U0SOMEONEELSE"
        conn.execute("UPDATE audit_events SET actor_id = %s, hash = %s, canon = NULL WHERE seq = 3",
                     (third["actor_id"], audit_hash(third["prev_hash"], audit_record(third))))
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "channel: BROKEN: the database differs from what was posted at seq 3\n" in proc.stdout, proc.stdout
    await _rewrite_from_seq3(bot, state_db)
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert proc.returncode == 1 and "database: OK" in proc.stdout, proc.stdout + proc.stderr
    assert "channel: BROKEN: the database differs from what was posted at seq 3, 4, 5, 6, 7" in proc.stdout, proc.stdout


async def test_verify_against_a_compact_channel_finds_missing_and_extra_rows(bot: Harness, state_db: str, platform_db: str,
                                                                             redis_url: str) -> None:
    """Rows cut off the end (rows 239 and 240 are inside the last line, before its full hash) are
    missing; a row slipped into the middle (the chain rewritten around it, so it verifies) moves
    every row after it, which the channel shows at the row it took the place of."""
    from bot.adapters.audit_log import FIELDS, audit_hash, audit_record

    rows = await _compact_backlog(bot)
    env = _verify_env(bot, state_db, platform_db, redis_url)
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        conn.execute("DELETE FROM audit_outbox WHERE seq >= 238")
        conn.execute("DELETE FROM audit_events WHERE seq >= 238")
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert "database: OK: 237 rows" in proc.stdout and proc.returncode == 1, proc.stdout + proc.stderr
    assert "channel: MISSING: 3 posted rows are not in the database and no pruning checkpoint covers them: seq 238, 239, 240" \
        in proc.stdout, proc.stdout
    # An extra row at seq 10: rows 10..237 take the content of the row before them, the last one a
    # new seq, every hash from 10 on computed again.
    kept = rows[:237]
    extra = {**kept[9], "event": "approved", "actor_id": "U0MALLORY"}
    moved = [*kept[:9], extra, *kept[9:]]
    with psycopg.connect(state_db, autocommit=True) as conn:
        prev = kept[8]["hash"]
        for seq, row in enumerate(moved[9:], start=10):
            row = {**row, "seq": seq}
            digest = audit_hash(prev, audit_record(row))
            cols = [k for k in FIELDS if k not in ("seq", "at")]
            values = [psycopg.types.json.Jsonb(row[k]) if k in ("plan", "result") and row[k] is not None else row[k] for k in cols]
            if seq <= 237:
                conn.execute(f"UPDATE audit_events SET {', '.join(f'{k} = %s' for k in cols)}, at = %s, prev_hash = %s, hash = %s, "
                             "canon = NULL WHERE seq = %s", (*values, row["at"], prev, digest, seq))
            else:
                conn.execute(f"INSERT INTO audit_events (seq, at, {', '.join(cols)}, prev_hash, hash) "
                             f"VALUES (%s, %s, {', '.join(['%s'] * len(cols))}, %s, %s)", (seq, row["at"], *values, prev, digest))
            prev = digest
    proc = await _opsbot(env, "audit", "verify", "--against-channel")
    assert "database: OK: 238 rows" in proc.stdout and proc.returncode == 1, proc.stdout + proc.stderr
    assert "channel: BROKEN: the database differs from what was posted at seq 10, 11, 12" in proc.stdout, proc.stdout
    assert "MISSING: 2 posted rows" in proc.stdout, proc.stdout  # 238 is back (the moved row), 239 and 240 are not


async def test_web_api_calls_go_over_kept_connections_not_one_connection_each(bot: Harness) -> None:
    """Each command makes several Web API calls (its card, the audit channel's headline, permalinks,
    updates): they reuse the client's kept connections instead of opening (and closing) a TCP
    connection per call, which under load cost opsbot, and Slack's end, a tenth of a core."""
    for n in (4, 5, 6):
        await bot.slash(ALICE, f"/ops scale worker {n}")
        await bot.requested()
    await bot.eventually(lambda: all_posted(bot), what="the outbox to drain")
    calls = bot.slack.api_peers
    assert len(calls) >= 6
    assert len(set(calls)) <= len(calls) // 2, f"{len(set(calls))} connections for {len(calls)} Web API calls"
