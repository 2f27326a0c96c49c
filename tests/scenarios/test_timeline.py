"""Runbook: "after the incident, paste what opsbot did into the postmortem" — `/ops timeline` posts
what opsbot did or refused in the channel, with a Markdown file in the message's thread that
`opsbot audit verify --file` checks against the audit trail (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot import timeline
from bot.domain import OpsRequest
from bot.sandbox.slack_api import FakeSlack, Message
from tests.conftest import ALICE, CAROL, DAN, EVE, MALLORY
from tests.faults.proxy import TcpProxy
from tests.harness import Harness


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "bot", *args], capture_output=True, text=True, env={**clean, **(env or {})},
                          timeout=60, check=False)


async def incident(bot: Harness) -> dict[str, str]:
    """Three requests in #incident: one succeeded, one denied, one refused by the policy."""
    await bot.slash(ALICE, '/ops scale worker 6 --reason "INC-7 backlog"')
    ok = await bot.requested()
    await bot.click(CAROL, ok.id, "approve")
    await bot.state_of(ok.id, "succeeded")
    await bot.slash(ALICE, "/ops scale worker 4")
    no = await bot.requested()
    await bot.click(DAN, no.id, "deny")
    await bot.state_of(no.id, "denied")
    await bot.slash(MALLORY, "/ops scale worker 5")
    await bot.eventually(lambda: _has_event(bot, "policy_denied"), what="the refusal to be recorded")
    return {"succeeded": ok.id, "denied": no.id}


async def _has_event(bot: Harness, event: str) -> bool:
    return event in await bot.audit_events()


async def posted_timeline(bot: Harness, channel: str = Harness.INCIDENT) -> Message:
    async def probe() -> Message | None:
        return next((m for m in bot.slack.in_channel(channel) if "Incident timeline" in m.text), None)
    return await bot.eventually(probe, what="the timeline message")


async def uploaded(bot: Harness, message: Message) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        return next((f for f in bot.slack.files.values()
                     if f["shared"] == {"channel": message.channel, "thread_ts": message.ts}), None)
    return await bot.eventually(probe, what="the Markdown file in the timeline's thread")


async def test_timeline_of_an_incident_in_the_channel_with_a_verifiable_file(bot: Harness, tmp_path: Path) -> None:
    ids = await incident(bot)
    status, _ = await bot.slash(EVE, "/ops timeline --since 1h")
    assert status == 200
    message = await posted_timeline(bot)
    text = message.text
    assert "<#C0INCIDENT>" in text and "UTC" in text
    for event in ("requested", "approval_given", "approved", "succeeded", "denied", "policy_denied"):
        assert f"*{event}*" in text, event
    assert ids["succeeded"] in text and ids["denied"] in text
    assert "alice" in text.lower() and f"<@{ALICE}>" not in text.split("\n", 1)[1], "names, not mentions: nobody is pinged"
    rows = [r for r in await bot.runtime.audit.log.rows() if r["channel_id"] == Harness.INCIDENT]
    assert all(f"#{r['seq']}" in text for r in rows if r["event"] != "read" or "timeline" not in r["command_text"])

    # The file: in the message's thread, through files.getUploadURLExternal → upload URL → files.completeUploadExternal.
    f = await uploaded(bot, message)
    assert [m for m, _ in bot.slack.calls if m.startswith("files.")] == ["files.getUploadURLExternal", "files.completeUploadExternal"]
    md = f["content"].decode()
    assert f["name"].endswith(".md") and md.startswith("# Incident timeline")
    assert md.count("\n- `#") == len(rows) - _timeline_reads(rows), "every row of the channel in the window, but its own read"
    check = timeline.verify_text(md)
    assert check is not None and check.ok, check
    assert {seq for seq, _ in check.hashes} <= {int(r["seq"]) for r in rows}
    by_seq = {int(r["seq"]): r["hash"] for r in rows}
    assert all(by_seq[seq] == digest for seq, digest in check.hashes)

    # Reading the trail is itself recorded (last, after the file), as a read, not posted to the audit channel.
    reads = await timeline_reads(bot)
    assert len(reads) == 1 and reads[0]["actor_id"] == EVE
    assert reads[0]["result"]["timeline"]["entries"] == len(check.hashes)
    assert reads[0]["result"]["timeline"]["file"] == f["name"]


async def timeline_reads(bot: Harness) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        rows = await bot.runtime.audit.log.rows()
        return [r for r in rows if r["event"] == "read" and r["command_text"].startswith("timeline")] or None
    return await bot.eventually(probe, what="the timeline's read to be recorded")


def _timeline_reads(rows: list[dict[str, Any]]) -> int:
    return sum(1 for r in rows if r["event"] == "read" and str(r["command_text"]).startswith("timeline"))


async def test_verify_file_accepts_the_md_and_json_and_names_the_edited_seq(bot: Harness, state_db: str, tmp_path: Path) -> None:
    await incident(bot)
    await bot.slash(EVE, "/ops timeline --since 1h")
    md = (await uploaded(bot, await posted_timeline(bot)))["content"].decode()
    good = tmp_path / "timeline.md"
    good.write_text(md)
    db = {"DATABASE_URL": state_db}

    proc = cli("audit", "verify", "--file", str(good), env=db)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK:" in proc.stdout and "match the audit trail" in proc.stdout
    alone = cli("audit", "verify", "--file", str(good))
    assert alone.returncode == 0 and "not checked (DATABASE_URL is not set)" in alone.stdout

    # One entry's text changed in the list: verify fails and names that seq.
    line = next(x for x in md.splitlines() if x.startswith("- `#") and "**denied**" in x)
    seq = line.split("`#", 1)[1].split("`", 1)[0]
    edited = tmp_path / "edited.md"
    edited.write_text(md.replace(line, line.replace("**denied**", "**approved**")))
    proc = cli("audit", "verify", "--file", str(edited), env=db)
    assert proc.returncode == 1 and f"seq {seq}: the listed line was edited" in proc.stdout, proc.stdout

    # The same entry's row changed in the block (its actor), line re-rendered to match: its hash says so.
    block = md.split(timeline.FENCE, 1)[1]
    row_line = next(x for x in block.splitlines() if f'"seq": {seq},' in x or x.endswith(f'"seq": {seq}}}'))
    row = json.loads(row_line)
    forged = {**row, "actor_name": "mallory"}
    forged_md = md.replace(row_line, json.dumps(forged, sort_keys=True, ensure_ascii=False)).replace(
        timeline.entry_line(row), timeline.entry_line(forged))
    (tmp_path / "forged.md").write_text(forged_md)
    proc = cli("audit", "verify", "--file", str(tmp_path / "forged.md"))
    assert proc.returncode == 1 and f"seq {seq}: its content does not match its hash" in proc.stdout, proc.stdout

    # ...and with its hash recomputed as well, only the trail can tell: the database check catches it.
    from bot.adapters.audit_log import audit_hash, audit_record
    rehashed = {**forged, "hash": audit_hash(forged["prev_hash"], audit_record(forged))}
    rehashed_md = forged_md.replace(json.dumps(forged, sort_keys=True, ensure_ascii=False),
                                    json.dumps(rehashed, sort_keys=True, ensure_ascii=False)).replace(
        timeline.entry_line(forged), timeline.entry_line(rehashed))
    (tmp_path / "rehashed.md").write_text(rehashed_md)
    proc = cli("audit", "verify", "--file", str(tmp_path / "rehashed.md"))
    assert proc.returncode == 1 and f"does not link to seq {seq} " in proc.stdout, "the next row in the chain names it"
    from datetime import UTC, datetime
    alone_tl = timeline.Timeline(channel=Harness.INCIDENT, since=datetime.now(UTC), until=datetime.now(UTC),
                                 generated_at=datetime.now(UTC), entries=[rehashed])
    (tmp_path / "alone.md").write_text(timeline.markdown(alone_tl))
    offline = cli("audit", "verify", "--file", str(tmp_path / "alone.md"))
    assert offline.returncode == 0, "on its own, a re-hashed row is consistent: only the trail can tell"
    proc = cli("audit", "verify", "--file", str(tmp_path / "alone.md"), env=db)
    assert proc.returncode == 1 and f"seq {seq}: the trail's hash is" in proc.stdout, proc.stdout

    # An entry removed entirely (its line and its row) is fine: a timeline is a selection of rows.
    removed = "\n".join(x for x in md.splitlines() if x != line and x != row_line) + "\n"
    (tmp_path / "removed.md").write_text(removed)
    proc = cli("audit", "verify", "--file", str(tmp_path / "removed.md"), env=db)
    assert proc.returncode == 0, proc.stdout

    # The CLI writes the same timeline, as md and as json, and both verify; an edited json entry fails.
    out = tmp_path / "cli.json"
    proc = cli("audit", "timeline", "--since", "1h", "--channel", Harness.INCIDENT, "--format", "json", "-o", str(out), env=db)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["channel"] == Harness.INCIDENT and len(doc["rows"]) >= 10
    assert cli("audit", "verify", "--file", str(out), env=db).returncode == 0
    doc["rows"][2]["command_text"] = "scale worker 1"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    proc = cli("audit", "verify", "--file", str(tmp_path / "bad.json"), env=db)
    assert proc.returncode == 1 and f"seq {doc['rows'][2]['seq']}: its content does not match" in proc.stdout, proc.stdout
    proc = cli("audit", "timeline", "--since", "1h", "--format", "md", env=db)
    assert proc.returncode == 0 and proc.stdout.startswith("# Incident timeline — all channels")
    assert timeline.verify_text(proc.stdout) is not None and timeline.verify_text(proc.stdout).ok  # type: ignore[union-attr]


async def test_who_may_run_it_is_the_audit_rule(bot: Harness) -> None:
    await bot.slash(ALICE, "/ops timeline")
    reply = await bot.response(containing="Not allowed")
    assert "audit" in reply["text"] or "auditor" in reply["text"]
    assert not [m for m in bot.slack.in_channel(Harness.INCIDENT) if "Incident timeline" in m.text]
    assert "policy_denied" in await bot.eventually(bot.audit_events, what="the refusal")


@pytest.mark.parametrize(("args", "says"), [
    ("--since 1x", "neither a duration"),
    ("--since 2h --since 3h", "given twice"),
    ("--since " + "9" * 400 + "d", "neither a duration"),
    ("--since 2026-13-45", "neither a duration"),
    ("--since ２h", "neither a duration"),  # a full-width digit
    ("--channel #incident", "is not a channel"),
    ("--channel <#C0INC\u200bIDENT|incident>", "invisible character"),
    ("--channel <@U0EVE>", "is not a channel"),
    ('--channel "C0INC; DROP TABLE audit_events"', "is not a channel"),
    ("--channel C0" + "X" * 5000, "characters long"),
    ("--channel", "needs a value"),
    ("--bogus 1", "unknown timeline option"),
])
async def test_hostile_options_are_refused_with_what_to_type(bot: Harness, args: str, says: str) -> None:
    status, body = await bot.slash(EVE, f"/ops timeline {args}")
    assert status == 200
    assert says in body, body
    assert "/ops timeline [--since 2h]" in body or "invisible" in says or "long" in says, "parse errors show the usage"
    assert await bot.eventually(bot.audit_events, what="the attempt") == ["invalid"]
    assert not bot.slack.in_channel(Harness.INCIDENT)


async def test_all_channels_and_an_empty_window_are_refused_in_slack(bot: Harness) -> None:
    await bot.slash(EVE, "/ops timeline --channel all")
    reply = await bot.response(containing="--channel all")
    assert "opsbot audit timeline" in reply["text"]
    await bot.slash(EVE, "/ops timeline --since 1h --until 2h")
    reply = await bot.response(containing="window is empty")
    assert "must be before" in reply["text"]
    assert not bot.slack.in_channel(Harness.INCIDENT)


async def test_another_channel_by_mention_and_nothing_in_it(bot: Harness) -> None:
    await incident(bot)
    await bot.slash(EVE, "/ops timeline --channel <#C0QUIET|quiet> --since 30m")
    message = await posted_timeline(bot, channel=EVE)  # another channel's timeline: in EVE's DM with opsbot
    assert "<#C0QUIET>" in message.text and "nothing opsbot did or refused" in message.text
    assert f"in <#{Harness.INCIDENT}>" in message.text, "the DM says where it was asked"
    md = (await uploaded(bot, message))["content"].decode()
    assert "_Nothing opsbot did or refused in this window._" in md
    check = timeline.verify_text(md)
    assert check is not None and check.ok and check.hashes == []
    await bot.response(containing="sent to you privately")
    assert not [m for m in bot.slack.in_channel(Harness.INCIDENT) if "Incident timeline" in m.text]


async def _secret(bot: Harness) -> OpsRequest:
    """ALICE's request in a private channel, C0SECRET, that #incident's members need not see."""
    await bot.slash(ALICE, '/ops scale worker 6 --reason "SECRET-INC acquisition"', channel="C0SECRET")
    return await bot.requested()


def _shown_in(bot: Harness, channel: str) -> str:
    """Everything opsbot put in ``channel`` for all its members: messages, thread replies, files shared there."""
    texts = [m.all_text() for m in bot.slack.messages if m.channel == channel and m.user is None]
    files = [f["content"].decode() for f in bot.slack.files.values()
             if f["shared"] and f["shared"]["channel"] == channel and f["content"] is not None]
    return "\n".join(texts + files)


async def test_a_timeline_of_another_channel_is_sent_to_the_asker_privately_never_posted_here(bot: Harness) -> None:
    # The reviewer's repro: EVE (an auditor) asks in #incident for C0SECRET's timeline. Before the fix
    # it was posted in #incident, file and all, for every member of #incident to read.
    secret = await _secret(bot)
    await bot.slash(EVE, "/ops timeline --since 1h --channel C0SECRET", channel=Harness.INCIDENT)
    reply = await bot.response(containing="sent to you privately: it lists another channel's activity")
    assert "<#C0SECRET>" in reply["text"] and "direct message with opsbot" in reply["text"]
    assert reply.get("response_type", "ephemeral") == "ephemeral"

    # In EVE's DM with opsbot: the message and, in its thread, the Markdown file (shared through the
    # DM's conversation id from conversations.open, not the user id).
    message = await posted_timeline(bot, channel=EVE)
    assert secret.id in message.text and "SECRET-INC" in message.text and "<#C0SECRET>" in message.text
    f = await uploaded(bot, message)
    md = f["content"].decode()
    assert secret.id in md and "SECRET-INC" in md
    check = timeline.verify_text(md)
    assert check is not None and check.ok and check.hashes
    assert [a["users"] for a in bot.slack.calls_to("conversations.open")] == [EVE]
    assert [a["channel_id"] for a in bot.slack.calls_to("files.completeUploadExternal")] == ["D0EVE"]

    # Nothing of C0SECRET in #incident: no message, no thread reply, no file.
    shown = _shown_in(bot, Harness.INCIDENT)
    assert "SECRET-INC" not in shown and secret.id not in shown and "Incident timeline" not in shown
    assert not [m for m in bot.slack.in_channel(Harness.INCIDENT) if "Incident timeline" in m.text]

    # Recorded as the read it is, where it was typed, saying where it went.
    [read] = await timeline_reads(bot)
    assert read["actor_id"] == EVE and read["channel_id"] == Harness.INCIDENT
    outcome = read["result"]["timeline"]
    assert outcome["channel"] == "C0SECRET" and outcome["sent_to"] == "dm" and outcome["dm"] == "D0EVE"
    assert outcome["file"] == f["name"] and outcome["entries"] == len(check.hashes)


async def test_the_channels_own_timeline_is_still_posted_in_it(bot: Harness) -> None:
    # Naming the channel it is typed in (by mention) is not "another channel": posted there, as without --channel.
    await incident(bot)
    await bot.slash(EVE, f"/ops timeline --since 1h --channel <#{Harness.INCIDENT}|incident>")
    message = await posted_timeline(bot)
    await uploaded(bot, message)
    assert not bot.slack.calls_to("conversations.open") and not bot.slack.in_channel(EVE)
    [read] = await timeline_reads(bot)
    assert read["result"]["timeline"]["sent_to"] == "channel"


@pytest.mark.parametrize(("method", "error"), [("conversations.open", "user_not_found"), ("chat.postMessage", "channel_not_found")])
async def test_slack_refusing_the_dm_posts_nothing_anywhere_and_says_so_privately(bot: Harness, method: str, error: str) -> None:
    secret = await _secret(bot)
    bot.slack.fail_methods[method] = error
    await bot.slash(EVE, "/ops timeline --since 1h --channel C0SECRET", channel=Harness.INCIDENT)
    reply = await bot.response(containing="Nothing was posted here")
    assert error in reply["text"] and "opsbot audit timeline --channel C0SECRET" in reply["text"]
    assert "sent only to you privately" in reply["text"] and "SECRET-INC" not in reply["text"]
    [read] = await timeline_reads(bot)
    assert read["result"]["timeline"]["posted"].startswith("no:") and error in read["result"]["timeline"]["posted"]
    # fail closed: not in #incident, not in the DM, no file anywhere
    assert "SECRET-INC" not in _shown_in(bot, Harness.INCIDENT) and secret.id not in _shown_in(bot, Harness.INCIDENT)
    assert not bot.slack.in_channel(EVE) and not [f for f in bot.slack.files.values() if f["shared"]]
    assert not bot.slack.calls_to("files.getUploadURLExternal")


async def test_the_file_failing_in_the_dm_says_so_privately_and_posts_nothing_here(bot: Harness) -> None:
    await _secret(bot)
    bot.slack.upload_fails = True
    await bot.slash(EVE, "/ops timeline --since 1h --channel C0SECRET", channel=Harness.INCIDENT)
    reply = await bot.response(containing="sent to you privately")
    assert "without its Markdown file" in reply["text"] and "opsbot audit timeline --channel C0SECRET" in reply["text"]
    message = await posted_timeline(bot, channel=EVE)

    async def says() -> bool:
        return "could not be attached" in message.text
    await bot.eventually(says, what="the DM to say the file is missing")
    assert "SECRET-INC" not in _shown_in(bot, Harness.INCIDENT)


async def test_more_than_the_bound_is_cut_and_says_where_to_go_on(bot: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "MAX_ENTRIES", 5)
    monkeypatch.setattr(timeline, "MESSAGE_LINES", 3)
    await incident(bot)
    await bot.slash(EVE, "/ops timeline --since 1h")
    message = await posted_timeline(bot)
    assert "More than 5 entries" in message.text and "/ops timeline --channel <#C0INCIDENT> --since 20" in message.text
    assert "…and 2 more" in message.text
    md = (await uploaded(bot, message))["content"].decode()
    assert md.count("\n- `#") == 5 and "Cut at 5 entries" in md


async def test_slack_upload_failing_still_posts_and_says_the_file_is_missing(bot: Harness) -> None:
    await incident(bot)
    bot.slack.upload_fails = True
    await bot.slash(EVE, "/ops timeline --since 1h")
    message = await posted_timeline(bot)

    async def says() -> bool:
        return "could not be attached" in message.text
    await bot.eventually(says, what="the message to say the file is missing")
    assert "opsbot audit timeline --channel C0INCIDENT" in message.text
    assert not [f for f in bot.slack.files.values() if f["shared"]]
    reads = await timeline_reads(bot)
    assert reads[-1]["result"]["timeline"]["file"].startswith("not attached")


async def test_slack_refusing_the_post_answers_privately(bot: Harness) -> None:
    bot.slack.fail_methods["chat.postMessage"] = "not_in_channel"
    await bot.slash(EVE, "/ops timeline --since 1h")
    reply = await bot.response(containing="Could not post the timeline")
    assert "not_in_channel" in reply["text"] and "opsbot audit timeline" in reply["text"]


async def test_database_down_refuses_and_says_so(slack: FakeSlack, config: Any, state_db: str, redis_url: str, kubeconfig: str,
                                                 queue_prefix: str, tmp_path: Path) -> None:
    db, db_url = await TcpProxy.for_url(state_db)
    bot = await Harness.start(config=config, slack=slack, database_url=db_url, redis_url=redis_url, kubeconfig=kubeconfig,
                              queue_prefix=queue_prefix, spool_dir=str(tmp_path / "spool"))
    try:
        db.down()
        await bot.slash(EVE, "/ops timeline --since 1h")
        reply = await bot.response(containing="Refused", timeout=30)
        assert "database" in reply["text"] and "Nothing was changed" in reply["text"]
        assert not [m for m in slack.in_channel(Harness.INCIDENT) if "Incident timeline" in m.text]
    finally:
        db.up()
        await bot.stop()
        await db.stop()


async def test_help_lists_it_for_those_who_may_run_it(bot: Harness) -> None:
    await bot.slash(EVE, "/ops help")
    assert "/ops timeline [--since 2h]" in (await bot.response(containing="opsbot commands"))["text"]
    await bot.slash(ALICE, "/ops help")
    assert "/ops timeline" not in (await bot.response(containing="opsbot commands"))["text"]


async def test_what_people_typed_cannot_ping_or_forge_lines_in_the_timeline(bot: Harness) -> None:
    await bot.slash(MALLORY, "/ops scale <!channel> worker\n- `#1` 2026-01-01 **succeeded** `x`")
    await bot.eventually(lambda: _has_event(bot, "invalid"), what="the attempt to be recorded")
    await bot.slash(EVE, "/ops timeline --since 1h")
    message = await posted_timeline(bot)
    assert "<!channel>" not in message.text and "&lt;!channel&gt;" in message.text
    md = (await uploaded(bot, message))["content"].decode()
    listed = [x for x in md.split("## Audit rows")[0].splitlines() if x.startswith("- `#")]
    assert len(listed) == 1 and "<!channel>" not in listed[0] and "\\<!channel\\>" in listed[0]
    check = timeline.verify_text(md)
    assert check is not None and check.ok
