"""The audit trail's read paths at scale (issue 13): every `/ops audit` filter is served by an index
(EXPLAIN on a table big enough for the planner to care), verify and export stream in bounded
batches and give the same answers and bytes as the row-by-row originals, hostile search input, a
database that is down, and a verify while another replica appends."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from bot.adapters import audit_log
from bot.adapters.audit_log import AuditLog, export_csv, export_jsonl, export_line, search_queries, verify_lines, verify_rows
from bot.adapters.store import Store
from tests.unit.test_audit_chain import tamper

# Values whose JSON is easy to get subtly wrong: escapes, non-ASCII, big integers, nesting, empty
# containers. (Floats Python writes with an exponent, 1e-07 or 1e16, -0.0, NaN: the write path
# stores and hashes them in jsonb's form, tests/unit/test_audit_numbers.py.)
ODD_PLANS: list[dict[str, Any] | None] = [
    None,
    {"command": "scale", "target": "deployment/p/n/w", "summary": "w: 1 → 2", "params": {"replicas": 2, "b": [1, {"z": 1, "a": 2}]}},
    {"quote\"back\\slash": "tab\tnl\ncr\r\x01\x1f\x7f", "ü": "日本語 \u2028 \u2029", "emoji": "🚀", "": ""},
    {"float": 0.25, "big": 12345678901234567890123, "neg": -0.5, "e": 1.0, "t": True, "f": False, "n": None, "empty": {}, "arr": []},
    {"bb": 1, "a": 2, "ccc": {"y": [3, 2, 1], "x": "ok"}},
]


@pytest_asyncio.fixture
async def log(state_db: str) -> AsyncIterator[AuditLog]:
    store = Store(state_db, max_size=4)
    await store.open()
    yield AuditLog(store)
    await store.close()


async def fill_odd(log: AuditLog, rounds: int = 3) -> None:
    for i in range(rounds):
        for n, plan in enumerate(ODD_PLANS):
            await log.append(event=["requested", "failed"][n % 2], actor_id=f"U{n}", actor_name=f"nämé \"{n}\"", channel_id="C\\1",
                             request_id=None if n == 0 else f"r-{i}-{n}", command_text=f"scale w {n} --reason 'a\nb'",
                             plan=plan, result=None if n == 3 else {"i": i, "nested": {"k": [n, "v"]}})


async def test_streamed_verify_and_export_match_the_originals_byte_for_byte(log: AuditLog) -> None:
    await fill_odd(log)
    rows = await log.rows()
    assert verify_rows(rows).ok  # the original way
    report = await log.verify()  # several batches, the last one short
    assert report.ok and report.checked == len(rows) == 3 * len(ODD_PLANS), report.summary()
    out = io.StringIO()
    assert await export_jsonl(log, out, batch=4) == len(rows)
    # (split at "\n" only: U+2028 in a line is a line break to str.splitlines, not to JSON lines)
    assert out.getvalue().split("\n") == [*(export_line(r) for r in rows), ""]
    assert verify_lines(out.getvalue().split("\n"))[0].ok
    buf = io.StringIO()
    assert await export_csv(log, buf, batch=4) == len(rows)
    csv_matches(buf.getvalue(), rows)


async def test_a_fast_hash_that_misses_is_checked_the_original_way_and_an_edit_is_still_found(
        log: AuditLog, state_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await fill_odd(log, rounds=2)
    reread: list[int] = []
    real_row = audit_log._Snapshot.row

    def row(self: audit_log._Snapshot, seq: int) -> dict[str, Any] | None:
        reread.append(seq)
        return real_row(self, seq)

    monkeypatch.setattr(audit_log._Snapshot, "row", row)
    # Make every fast hash miss (a space after canon, or after PostgreSQL's pieces): each row is
    # then confirmed the original way, on the second connection (same snapshot), and verifies.
    monkeypatch.setattr(audit_log, "_WALK_SELECT", audit_log._WALK_SELECT.replace("prev_hash || canon", "prev_hash || canon || ' '", 1))
    assert (await log.verify()).ok
    assert reread == list(range(1, 2 * len(ODD_PLANS) + 1))
    reread.clear()
    monkeypatch.setattr(audit_log, "_WALK_SELECT", audit_log._WALK_COLUMNS.replace("'{\"actor_id\":'", "'{\"actor_id\": '", 1))
    assert (await log.verify()).ok  # every row re-derived from its columns, and missing
    assert reread == list(range(1, 2 * len(ODD_PLANS) + 1))
    out = io.StringIO()
    await export_jsonl(log, out)  # the export, too, then reads each row again
    assert out.getvalue().split("\n") == [*(export_line(r) for r in await log.rows()), ""]
    monkeypatch.undo()
    tamper(state_db, "UPDATE audit_events SET plan = jsonb_set(plan, '{ccc,x}', '\"edited\"') WHERE seq = 5")
    report = await log.verify()
    assert not report.ok and report.broken_at == 5 and "content does not match" in report.problem
    assert report.checked == 4 and (report.first_seq, report.last_seq) == (1, 4)


async def test_the_export_is_written_in_bounded_chunks(log: AuditLog) -> None:
    await fill_odd(log, rounds=4)
    writes: list[int] = []

    class Out(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s.count("\n"))
            return super().write(s)

    out = Out()
    assert await export_jsonl(log, out, batch=7) == 20
    assert writes == [7, 7, 6]  # never more than one chunk of lines in memory
    assert verify_lines(out.getvalue().split("\n"))[0].ok


async def test_verify_while_another_replica_appends_sees_one_consistent_chain(log: AuditLog, state_db: str) -> None:
    await fill_odd(log, rounds=20)
    other = Store(state_db, max_size=2)
    await other.open()
    try:
        async def append_more() -> None:
            for i in range(60):
                await AuditLog(other).append(event="requested", actor_id="U9", actor_name="", channel_id="C", request_id=f"x{i}",
                                             command_text="x", plan={"i": i}, result=None)
        reports = await asyncio.gather(append_more(), *(log.verify() for _ in range(3)))
    finally:
        await other.close()
    assert all(r.ok for r in reports[1:]), [r.summary() for r in reports[1:]]
    assert (await log.verify()).checked == 20 * len(ODD_PLANS) + 60


async def test_verify_file_streams_and_finds_an_edit(log: AuditLog, state_db: str, tmp_path: Path) -> None:
    await fill_odd(log)
    out = tmp_path / "e.jsonl"
    env = {**os.environ, "DATABASE_URL": state_db}
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "export", "-o", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "verify", "--file", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "OK: 15 rows, seq 1..15" in proc.stdout, proc.stdout
    lines = out.read_text().split("\n")
    edited = json.loads(lines[2])
    edited["plan"]["emoji"] = "🛑"
    report, _ = verify_lines([*lines[:2], json.dumps(edited), *lines[3:]])
    assert not report.ok and report.broken_at == 3
    report, _ = verify_lines([*lines[:5], *lines[6:]])
    assert not report.ok and report.broken_at == 6 and "missing" in report.problem


def test_verify_with_the_database_down_says_so_and_does_not_hang() -> None:
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "verify"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"})
    assert proc.returncode == 1 and "database" in proc.stderr.lower() and "OK" not in proc.stdout, (proc.stdout, proc.stderr)


# ------------------------------------------------------------------ search


@pytest.fixture
def big_db(state_db: str) -> str:
    """50,000 rows written straight in SQL (their hashes are not a chain: search does not care), analysed."""
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
        conn.execute("""
            INSERT INTO audit_events (seq, at, event, actor_id, actor_name, channel_id, request_id, command_text, plan, result,
                                      prev_hash, hash)
            SELECT g, now() - make_interval(secs => 50000 - g), (ARRAY['requested','approved','succeeded','failed','read'])[1 + g % 5],
                   'U' || (g % 500), 'user' || (g % 500), 'C1', 'r-' || (g / 4),
                   (ARRAY['scale','restart','status'])[1 + g % 3] || ' w' || (g % 97),
                   jsonb_build_object('command', (ARRAY['scale','restart','status'])[1 + g % 3], 'target_name', 'w' || (g % 97),
                                      'target_label', 'ns/w' || (g % 97), 'target', 'deployment/prod/ns/w' || (g % 97)),
                   NULL, md5(g::text) || md5(g::text), md5(g::text || 'h') || md5(g::text)
            FROM generate_series(1, 50000) g""")
        conn.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")
        conn.execute("ANALYZE audit_events")
    return state_db


FILTERS: list[dict[str, Any]] = [
    {"user": "U7"}, {"user": "@user7"}, {"command": "restart"}, {"target": "w42"}, {"target": "ns/w4"},
    {"since": datetime.now(UTC) - timedelta(minutes=5)}, {"outcome": "failed"},
    {"user": "U7", "since": datetime.now(UTC) - timedelta(days=7)}, {"outcome": "failed", "command": "scale"},
]


@pytest.mark.parametrize("filters", FILTERS, ids=[",".join(f) for f in FILTERS])
async def test_every_search_filter_uses_an_index(big_db: str, filters: dict[str, Any]) -> None:
    (page, page_args), (count, count_args) = search_queries(**filters, limit=15, offset=30)
    with psycopg.connect(big_db) as conn:
        for query, args in ((page, page_args), (count, count_args), search_queries(**filters, limit=15, before_seq=40000)[0]):
            if query is count and "target" in filters:
                conn.execute(audit_log.COUNT_BY_BITMAP)  # as AuditLog.search counts --target (in its own transaction)
            plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN ") + query, args).fetchall())
            conn.rollback()
            assert "Seq Scan on audit_events" not in plan, plan
            assert "audit_events_" in plan, plan  # an index of audit_events (the filter's own, or seq's for the newest rows)


def _rows_read_and_dropped(plan: str) -> int:
    return sum(int(n) for n in re.findall(r"Rows Removed by (?:Filter|Index Recheck): (\d+)", plan))


@pytest.mark.parametrize("filters", FILTERS, ids=[",".join(f) for f in FILTERS])
async def test_the_bounded_count_reads_about_the_cap_whatever_the_filter(big_db: str, filters: dict[str, Any]) -> None:
    """The count reads a bounded number of rows (about 20 times SEARCH_COUNT_CAP at most) whatever the filter. --target (trigram
    indexes, bitmaps without order) used to walk the whole table newest first for it, reading and
    dropping every row that did not match (151 ms at 1M rows; 400 ms under load)."""
    _, (count, count_args) = search_queries(**filters, limit=16, offset=0)
    with psycopg.connect(big_db) as conn:  # (in a transaction, as AuditLog.search counts)
        if "target" in filters:
            conn.execute(audit_log.COUNT_BY_BITMAP)
        plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN (ANALYZE, TIMING OFF) ") + count, count_args).fetchall())
    assert _rows_read_and_dropped(plan) <= 20 * (audit_log.SEARCH_COUNT_CAP + 1), plan  # a walk newest first stops at the cap too
    assert "Seq Scan on audit_events" not in plan, plan


async def test_search_pages_by_keyset_and_counts_only_up_to_the_cap(big_db: str) -> None:
    store = Store(big_db, max_size=2)
    await store.open()
    try:
        log = AuditLog(store)
        rows, total = await log.search(outcome="failed", limit=15)
        assert total == audit_log.SEARCH_COUNT_CAP + 1  # 10,000 match: "more than 1,000", not a count of them all
        nxt, _ = await log.search(outcome="failed", limit=15, before_seq=rows[-1]["seq"])
        by_offset, _ = await log.search(outcome="failed", limit=15, offset=15)
        assert [r["seq"] for r in nxt] == [r["seq"] for r in by_offset] and nxt[0]["seq"] < rows[-1]["seq"]
        few, n = await log.search(user="U7", command="scale", limit=15)
        assert 0 < n < audit_log.SEARCH_COUNT_CAP and all(r["actor_id"] == "U7" for r in few)
    finally:
        await store.close()


async def test_hostile_target_wildcards_match_literally(big_db: str) -> None:
    store = Store(big_db, max_size=2)
    await store.open()
    try:
        log = AuditLog(store)
        for hostile in ("%", "_", "w4%", "\\", "'; DROP TABLE audit_events; --"):
            rows, total = await log.search(target=hostile, limit=15)
            assert (rows, total) == ([], 0), hostile
        assert (await log.search(target="w42", limit=15))[1] > 0
    finally:
        await store.close()


async def test_user_search_merges_two_index_walks_and_counts_each_row_once(big_db: str) -> None:
    """--user matches the id or the name: two walks newest first, one per index, merged. A row
    matching both counts once; a user with more rows than the cap is counted by reading about the
    cap of index entries (the OR fetched every row of theirs: 412 ms at 10M rows)."""
    cap = audit_log.SEARCH_COUNT_CAP
    with psycopg.connect(big_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
        # U9000: 2,500 rows by id, one in 20 of the table; U8000: 60 by id and name, 60 by name only, 60 by id only
        conn.execute("UPDATE audit_events SET actor_id = 'U9000', actor_name = 'nine' WHERE seq % 20 = 0")
        # opsbot's own rows: the id is the name (2,500, one in 20)
        conn.execute("UPDATE audit_events SET actor_id = 'opsbot', actor_name = 'opsbot' WHERE seq % 20 = 10")
        conn.execute("""
            INSERT INTO audit_events (seq, at, event, actor_id, actor_name, channel_id, request_id, command_text, plan, result,
                                      prev_hash, hash)
            SELECT 50000 + g, now(), 'requested', CASE WHEN g % 3 = 0 THEN 'U-x' ELSE 'U8000' END,
                   CASE WHEN g % 3 = 1 THEN 'eight' ELSE 'U8000' END, 'C1', 'r', 'scale w 1',
                   '{"command":"scale"}', NULL, md5(g::text) || md5('x'), md5(g::text || 'x') || md5(g::text)
            FROM generate_series(1, 180) g""")
        conn.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")
        conn.execute("VACUUM ANALYZE audit_events")  # (as autovacuum would: the count reads the index alone)
    store = Store(big_db, max_size=2)
    await store.open()
    try:
        log = AuditLog(store)
        with psycopg.connect(big_db) as conn:
            for user, name in (("U9000", "U9000"), ("@nine", "nine"), ("U8000", "U8000"), ("@U8000", "U8000"), ("U7", "U7"),
                               ("opsbot", "opsbot"), ("@opsbot", "opsbot"),
                               ("@user7", "user7"), ("U\uff19000", "U\uff19000")):  # (a fullwidth 9: nobody)
                want = [r[0] for r in conn.execute("SELECT seq FROM audit_events WHERE actor_id = %s OR actor_name = %s "
                                                   "ORDER BY seq DESC", (user, name)).fetchall()]
                assert want or user.startswith("U\uff19")
                for offset in (0, 15, 990):
                    rows, total = await log.search(user=user, limit=15, offset=offset)
                    assert [r["seq"] for r in rows] == want[offset:offset + 15], (user, offset)
                    assert total == min(len(want), cap + 1), user
                if len(want) > 20:
                    rows, _ = await log.search(user=user, limit=15, before_seq=want[20])
                    assert [r["seq"] for r in rows] == want[21:36], user
            # rows read: about the cap for the count (the OR read all 2,500 of U9000's, or 20,000 rows
            # newest first); for a page, not the table (leaving the id's rows out of the name's
            # branch walked all 53,000 for opsbot, whose id is its name). (A page's exact plan is the
            # planner's choice on a table this small: a walk newest first reading ~1,000 is fine.)
            for user in ("U9000", "opsbot", "@nine"):
                (page, page_args), (count, args) = search_queries(user=user, limit=15, offset=30)
                for query, query_args, bound in ((page, page_args, 5000), (count, args, 2 * (cap + 1))):
                    plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN (ANALYZE, TIMING OFF) ") + query,
                                                                 query_args).fetchall())
                    read = sum(int(n) for n in re.findall(r"Scan[^\n]* on audit_events[^\n]*actual rows=(\d+)", plan)) \
                        + _rows_read_and_dropped(plan)
                    assert read <= bound and "Seq Scan" not in plan, (user, plan)
    finally:
        await store.close()


def test_the_csv_export_is_computed_by_parallel_workers_in_seq_order_byte_for_byte(
        big_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The csv's cost is the server's projection (jsonb → text, to_char): the export lets two of
    PostgreSQL's parallel workers compute it while its own backend merges their rows in seq order.
    The bytes are those of the export without them, for a range too; a server with no worker to
    give runs the plan in the backend, the same bytes again."""
    with psycopg.connect(big_db, autocommit=True) as conn:  # rows whose order by seq is not their order on disk
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
        conn.execute("UPDATE audit_events SET command_text = command_text || ' \"q\",' || chr(10) WHERE seq % 7 = 0")
        conn.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")
        conn.execute("VACUUM ANALYZE audit_events")
    real = audit_log._Snapshot.parallel
    plans: list[dict[str, Any]] = []

    def parallel(self: audit_log._Snapshot) -> None:
        real(self)
        plans.append(self.query("EXPLAIN (FORMAT JSON) " + audit_log._CSV_SELECT + " ORDER BY seq")[0]["QUERY PLAN"][0]["Plan"])

    monkeypatch.setattr(audit_log._Snapshot, "parallel", parallel)
    since, until = datetime.now(UTC) - timedelta(seconds=30000), datetime.now(UTC) - timedelta(seconds=1000)
    outputs: dict[str, list[bytes]] = {}
    for mode in ("parallel", "none free", "serial"):
        if mode == "none free":
            monkeypatch.setattr(audit_log._Snapshot, "parallel", lambda self: (real(self), self.query(
                "SELECT set_config('max_parallel_workers', '0', true)")))
        elif mode == "serial":
            monkeypatch.setattr(audit_log._Snapshot, "parallel", lambda self: None)
        outputs[mode] = []
        for rng in ({}, {"since": since, "until": until}):
            buf = io.BytesIO()
            n = audit_log.csv_chain(big_db, buf, **rng)
            assert n == buf.getvalue().count(b"\n") - buf.getvalue().count(b"\n\"") - 1 and n > 20000  # (rows, not lines)
            outputs[mode].append(buf.getvalue())
    assert plans and all(p["Node Type"] == "Gather Merge" and p["Workers Planned"] == 2 for p in plans), plans
    assert outputs["parallel"] == outputs["none free"] == outputs["serial"]
    got = list(csv.reader(io.StringIO(outputs["parallel"][0].decode(), newline="")))
    assert [int(r[0]) for r in got[1:]] == list(range(1, 50001)) and got[7][7].endswith(' "q",\n')
    header, _, ranged = outputs["parallel"][1].partition(b"\n")
    assert header == b",".join(c.encode() for c in audit_log.CSV_HEADER) and ranged.startswith(b"20") and ranged in outputs["parallel"][0]
    seqs = [int(r[0]) for r in csv.reader(io.StringIO(ranged.decode(), newline=""))]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and 28990 <= len(seqs) <= 29010  # (the seconds since the rows were written)


# ------------------------------------------------------------------ export on hostile rows (issue 13)
# The export's bytes are export_line's, also on rows whose canon (migration 009) says what the
# columns say in another form the CHECK accepts: a guard for any export that reads canon.

HOSTILE_PLANS: list[dict[str, Any]] = [
    {"n": 100, "z": 0.0, "a": 1, "w": "w", "nan": float("nan"), "inf": float("-inf"), "big": 1e16, "small": 1e-07, "neg0": -0.0,
     "huge": 12345678901234567890123456789, "frac": 0.30000000000000004, "nul": "\\u0000 is text", "nested": [[{"b": 1, "a": [{}]}]]},
    {"fingerprint": "00004e2d1e5", "date": "2026-01-02", "k": "1e5", "unicode": "ü 日本 🚀 \u2028", "quote": "\"plan\":{}"},
]


async def fill_hostile(log: AuditLog) -> None:
    await fill_odd(log, rounds=1)
    for i, plan in enumerate(HOSTILE_PLANS * 2):
        await log.append(event="requested", actor_id="U1", actor_name="a", channel_id="C", request_id=f"h{i}", command_text='"plan":',
                         plan=plan, result={"e": 1e16, "list": [1.5, -0.0]} if i % 2 else None)


@pytest.mark.parametrize("edit", [
    "", "canon = replace(canon, '\"n\":100', '\"n\":1e2')",  # jsonb writes 1e2 as 100: an int to Python, not 100.0
    "canon = replace(canon, '\"z\":0.0', '\"z\":-0.0')",
    "canon = replace(canon, '\"n\":100', '\"n\": 100')",  # spaces
    "canon = replace(canon, '\"plan\":{\"a\":1', '\"plan\":{\"a\":0,\"a\":1')",  # a duplicate key (jsonb keeps the last)
    "canon = replace(canon, '\"w\":\"w\"', '\"w\":\"\\u0077\"')",  # an escape Python does not write
    "canon = replace(canon, '\"plan\":{\"a\"', '\"plan\":{\"x\":1},\"plan\":{\"a\"')",  # two plan members: canon's plan is the last
    "canon = NULL",  # rows from before migration 009
])
async def test_the_export_from_canon_is_byte_for_byte_the_original_on_hostile_rows(
        log: AuditLog, state_db: str, edit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await fill_hostile(log)
    if edit:
        tamper(state_db, f"UPDATE audit_events SET {edit} WHERE seq > 5", constraint="untouched")  # the CHECK still holds
    assert (await audit_log.canon_trusted(log.store))[0]
    rows = await log.rows()
    reread: list[int] = []
    real_row = AuditLog.row

    async def row(self: AuditLog, seq: int) -> dict[str, Any] | None:
        reread.append(seq)
        return await real_row(self, seq)

    monkeypatch.setattr(AuditLog, "row", row)
    out = io.StringIO()
    assert await export_jsonl(log, out, batch=4) == len(rows)
    assert out.getvalue().split("\n") == [*(export_line(r) for r in rows), ""]
    buf = io.StringIO()
    assert await export_csv(log, buf, batch=4) == len(rows)
    csv_matches(buf.getvalue(), rows)
    if not edit:  # written by append: no row needs reading again
        assert reread == []


def csv_matches(text: str, rows: list[dict[str, Any]]) -> None:
    """The csv export says what the rows say: every column as text, plan and result as JSON (in
    jsonb's form since issue 13's fast export: PostgreSQL writes the file)."""
    got = list(csv.reader(io.StringIO(text, newline="")))
    assert got[0] == list(audit_log.CSV_HEADER) and len(got) == len(rows) + 1
    for line, r in zip(got[1:], rows, strict=True):
        rec = audit_log.audit_record(r)
        assert line[:8] == [str(rec["seq"]), rec["at"], rec["event"], rec["actor_id"], rec["actor_name"], rec["channel_id"],
                            rec["request_id"] or "", rec["command_text"]], line
        assert json.loads(line[8]) == rec["plan"] and json.loads(line[9]) == rec["result"], line
        assert line[10:] == [r["prev_hash"], r["hash"]]
