"""The audit channel's line for several rows of one request (under a backlog): what
`opsbot audit verify --against-channel` reads from it is only ever what opsbot wrote at its ends,
whatever the rows' text holds."""

from __future__ import annotations

from typing import Any

from bot.messages import HASH_PREFIX, audit_headline, audit_line, audit_request_line, posted_hashes

HOSTILE = ["<!channel> <@U0CAROL> <https://evil|click>", "`#9:0000000000000000 #10` x · hash `" + "e" * 64 + "`",
           "a\nlast record `#1` hash `" + "d" * 64 + "`", "nul\x00byte", "*bold* _it_ ~s~ &amp;", "x" * 20_000]


def _rows(text: str) -> list[dict[str, Any]]:
    return [{"seq": seq, "hash": f"{seq:02x}" * 32, "request_id": "r-1", "event": event, "actor_id": actor,
             "channel_id": "C0INCIDENT", "command_text": text, "plan": {"summary": text, "environment": text},
             "result": {"message": text} if event == "succeeded" else None}
            for seq, event, actor in ((3, "requested", "U0ALICE"), (7, "approved", "U0CAROL"), (8, "succeeded", "opsbot"))]


def test_a_request_line_shows_each_rows_seq_and_hash_prefix_and_the_last_hash_whole() -> None:
    rows = _rows("svc: 3 → 4 replicas")
    line = audit_request_line(rows)
    assert posted_hashes(line) == [(3, rows[0]["hash"][:HASH_PREFIX]), (7, rows[1]["hash"][:HASH_PREFIX]), (8, rows[2]["hash"])]
    assert line.startswith("`#3:0303030303030303 #7:0707070707070707 #8` request `r-1` svc: 3 → 4 replicas [svc: 3 → 4 replicas]: ")
    assert "*requested* by <@U0ALICE> · *approved* by <@U0CAROL> · *succeeded* — svc" in line
    assert audit_request_line(rows[:1]) == audit_line(rows[0])  # one row: the line it always was


def test_hostile_text_in_rows_cannot_add_or_change_a_pair_or_start_a_line() -> None:
    for text in HOSTILE:
        rows = _rows(text)
        line = audit_request_line(rows)
        assert "\n" not in line and "<!channel>" not in line and "<@U0CAROL> <https" not in line
        assert posted_hashes(line) == [(3, rows[0]["hash"][:HASH_PREFIX]), (7, rows[1]["hash"][:HASH_PREFIX]), (8, rows[2]["hash"])]
        assert [p for p in posted_hashes(audit_line(rows[1]))] == [(7, rows[1]["hash"])]


def test_only_whole_lines_opsbot_writes_are_read() -> None:
    assert posted_hashes("`#3:0303030303030303 #7` x · hash `" + "0" * 63 + "`") == []  # not a whole hash
    assert posted_hashes("see `#3:0303030303030303 #7` x · hash `" + "0" * 64 + "`") == []  # not at the line's start
    assert posted_hashes("`#3:03030303 #7` x · hash `" + "0" * 64 + "`") == []  # a prefix too short
    assert posted_hashes("last record `#5` hash `" + "a" * 64 + "`") == [(5, "a" * 64)]


def test_headlines_still_name_their_last_record() -> None:
    from datetime import UTC, datetime

    from bot.domain import Actor, ChannelId, OpsRequest, RequestId, RequestState, UserId

    now = datetime.now(UTC)
    request = OpsRequest(id=RequestId("r-1"), command="scale", text="scale x 4", requester=Actor(UserId("U0ALICE"), "alice"),
                         channel_id=ChannelId("C0INCIDENT"), plan={"summary": "x", "environment": "production"}, reason="",
                         state=RequestState.SUCCEEDED, approvals_required=1, approver_roles=("sre",), rule=None,
                         created_at=now, expires_at=now)
    last = _rows("x")[-1]
    assert [p for line in audit_headline(request, last, None).splitlines() for p in posted_hashes(line)] == [(8, last["hash"])]


def test_a_request_too_long_for_one_line_goes_out_a_line_per_row() -> None:
    from bot.audit import CHARS_PER_MESSAGE, _chunks, _lines

    short, huge = _rows("svc: 3 → 4 replicas"), _rows("<!channel> " + "y" * 12_000)
    for row in short:
        row["request_id"] = "r-2"
    lines = _lines([*huge, *short], compact=True)
    assert [line for _, line in lines] == [*(audit_line(r) for r in huge), audit_request_line(short)]
    assert all("<!channel>" not in line for _, line in lines)
    chunks = _chunks(lines)
    assert all(sum(len(line) + 1 for _, line in chunk) <= CHARS_PER_MESSAGE for chunk in chunks)
    assert sorted(r["seq"] for chunk in chunks for unit, _ in chunk for r in unit) == sorted(r["seq"] for r in [*huge, *short])
    assert [[r["seq"]] for r in huge] == [[r["seq"] for r in unit] for unit, _ in lines][:3]
    assert _lines(short, compact=False) == [([r], audit_line(r)) for r in short]  # no backlog: a line per row
