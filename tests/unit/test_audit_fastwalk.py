"""The fast walk of `audit verify` / `audit export` / `verify --file` (issue 13) the way it breaks:
forged hashes whose bytes try to look like the fixed layout, hostile export files, a database
that stalls or drops mid-read, a prune racing a verify. Real PostgreSQL; the faults through a TCP
proxy."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.adapters import audit_log
from bot.adapters.audit_log import AuditLog, export_jsonl, export_line, verify_lines
from bot.domain import canonical_json
from bot.errors import BackendUnavailable
from tests.faults.proxy import TcpProxy
from tests.unit.test_audit_chain import tamper
from tests.unit.test_audit_scale import ODD_PLANS, fill_odd


def _recompute(seq: int) -> str:
    """SQL: row ``seq``'s hash made right again for whatever its prev_hash and canon are now (a forger who
    controls that row)."""
    return (f"UPDATE audit_events SET hash = encode(sha256(convert_to(prev_hash || canon, 'UTF8')), 'hex') WHERE seq = {seq}")


# Row 4 forged in ways that keep migration 009's CHECK (which says nothing about the hashes) valid,
# so the fast path is the one asked: (the edits, where the walk must stop, what it must say).
FORGERIES: list[tuple[list[str], int, str]] = [
    (["UPDATE audit_events SET hash = hash || ' x' WHERE seq = 4"], 4, "content does not match"),
    (["UPDATE audit_events SET hash = upper(hash) WHERE seq = 4"], 4, "content does not match"),
    # 64 bytes, but not hex, and a quote in it; the row's hash made to match it
    (["UPDATE audit_events SET prev_hash = left(prev_hash, 62) || '\"' || chr(1) WHERE seq = 4", _recompute(4)], 4, "does not link"),
    # a 66-byte hash that starts with the right 64, and the next row linked to it
    (["UPDATE audit_events SET hash = hash || 'ff' WHERE seq = 4",
      "UPDATE audit_events SET prev_hash = (SELECT hash FROM audit_events WHERE seq = 4) WHERE seq = 5", _recompute(5)],
     4, "content does not match"),
    # a hash whose tail spells the layout that follows it (seq, prev): the walk reads lengths, not text
    (["UPDATE audit_events SET hash = hash || repeat('0', 8) || (SELECT hash FROM audit_events WHERE seq = 3) WHERE seq = 4"],
     4, "content does not match"),
    (["DELETE FROM audit_events WHERE seq = 4"], 4, "missing"),
    # look-alike digits: the row's seq is right but canon's is not (the CHECK is checked, so both must agree):
    (["UPDATE audit_events SET prev_hash = 'ａ' || right(prev_hash, 63) WHERE seq = 4", _recompute(4)], 4, "does not link"),
]


@pytest.mark.parametrize("edits,broken_at,problem", FORGERIES, ids=[f"forgery{i}" for i in range(len(FORGERIES))])
async def test_forged_hashes_are_found_by_verify_by_the_export_and_by_verify_file(
        trail: AuditLog, state_db: str, edits: list[str], broken_at: int, problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await fill_odd(trail)
    odd: list[int] = []
    real_odd_row = audit_log._odd_row

    def odd_row(f: list[bytes | None], enc: str) -> Any:
        odd.append(int.from_bytes(f[1] or b"", "big", signed=True))
        return real_odd_row(f, enc)

    monkeypatch.setattr(audit_log, "_odd_row", odd_row)
    assert (await trail.verify()).ok and (await export_jsonl(trail, io.StringIO())) == 15
    assert odd == []  # rows written by append all take the fast path (else it is broken and only the slow one works)
    tamper(state_db, *edits, constraint="untouched")
    assert (await audit_log.canon_trusted(trail.store))[0]  # the fast path is the one tried
    report = await trail.verify()
    assert not report.ok and report.broken_at == broken_at and problem in report.problem, report.summary()
    assert report.checked == broken_at - 1 and report.last_seq == broken_at - 1
    out = io.StringIO()
    n = await export_jsonl(trail, out)
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == n + 1
    parsed = [json.loads(line) for line in lines[:-1]]  # every line is JSON, whatever the hashes hold
    rows = await trail.rows()
    assert [p["hash"] for p in parsed] == [r["hash"] for r in rows] and [p["prev_hash"] for p in parsed] == [r["prev_hash"] for r in rows]
    assert lines[:-1] == [export_line(r) for r in rows]
    file_report, _ = verify_lines(lines)
    assert not file_report.ok and file_report.broken_at == broken_at, file_report.summary()
    assert odd[0] == (broken_at + 1 if problem == "missing" else broken_at)  # the forged row was taken off the fast path


async def test_an_untrusted_constraint_walks_every_row_from_its_columns_and_still_finds_an_edit(trail: AuditLog, state_db: str) -> None:
    await fill_odd(trail)
    tamper(state_db, "UPDATE audit_events SET command_text = 'scale w 99' WHERE seq = 7")  # CHECK re-added NOT VALID
    trusted, why = await audit_log.canon_trusted(trail.store)
    assert not trusted and "not validated" in why
    report = await trail.verify()
    assert not report.ok and report.broken_at == 7 and report.checked == 6, report.summary()
    out = io.StringIO()
    await export_jsonl(trail, out)
    edited = json.loads(out.getvalue().split("\n")[6])
    assert edited["command_text"] == "scale w 99"  # the export says what the columns say (not canon)
    assert verify_lines(out.getvalue().split("\n"))[0].broken_at == 7


def _old_export_line(row: dict[str, Any]) -> str:
    """What `audit export` wrote before the fast walk (sorted keys, ", " and ": ")."""
    record = {**audit_log.audit_record(row), "prev_hash": row["prev_hash"], "hash": row["hash"]}
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


async def test_hostile_export_files_are_reported_not_crashed_on(trail: AuditLog) -> None:
    await fill_odd(trail)
    rows = await trail.rows()
    good = [export_line(r).encode() + b"\n" for r in rows]
    assert verify_lines(good)[0].ok
    assert verify_lines([_old_export_line(r) + "\n" for r in rows])[0].ok  # exports written before still verify
    assert verify_lines([line.replace(b"\n", b"\r\n") for line in good])[0].ok  # CRLF: checked the slow way, same answer
    mixed = [good[i] if i % 2 else _old_export_line(r).encode() + b"\n" for i, r in enumerate(rows)]
    assert verify_lines(mixed)[0].ok

    def broken(lines: list[bytes]) -> Any:
        report, _ = verify_lines(lines)
        assert not report.ok, report.summary()
        return report

    # the record's seq changed (the layout's own number): the hash misses
    forged = good[3].replace(b',"seq":4}', b',"seq":5}')
    assert broken([*good[:3], forged, *good[5:]]).broken_at == 4
    # a record whose seq is spelled inside a string: read the slow way, it is still row 4's hash that misses
    sneaky = good[3].replace(b'"command_text":"', b'"command_text":",\\"seq\\":4}')
    assert broken([*good[:3], sneaky, *good[4:]]).broken_at == 4
    for bad in (b'{"hash":"\x00' + good[3][10:], good[3][:200] + b"\xff\xfe" + good[3][202:], b"x" * 5_000_000 + b"\n",
                good[3][:-40] + b"\n", b"[1, 2]\n", b'{"hash": "a", "prev_hash": "b"}\n',
                good[3].replace(b'"seq"', '"ѕeq"'.encode())):  # a Cyrillic ѕ
        report = broken([*good[:3], bad, *good[4:]])
        assert report.broken_at == 4 and report.checked == 3, (bad[:60], report.summary())
        assert "line 4" in report.problem or "row 4" in report.problem, report.summary()
    # a file made up whole, its chain right, whose records carry a "hash" member of their own: a
    # reader of such a line sees that hash, not the one checked, so it is never taken on its bytes
    made, prev = [], "0" * 64
    for i, r in enumerate(rows):
        text = canonical_json({**audit_log.audit_record(r), **({"hash": "f" * 64} if i else {})})
        digest = hashlib.sha256((prev + text).encode()).hexdigest()
        made.append(f'{{"hash":"{digest}","prev_hash":"{prev}",{text[1:]}\n'.encode())
        prev = digest
    assert broken(made).broken_at == 2  # (the first line is always read the slow way)
    # a forged first line (the anchor) whose prev_hash holds a quote: checked the slow way
    head = json.loads(good[0])
    head["prev_hash"] = 'x"' * 32
    assert verify_lines([json.dumps(head).encode(), *good[1:]])[0].broken_at == 1
    # a plan with a "hash" key of its own verifies (its lines the slow way)
    await trail.append(event="requested", actor_id="U1", actor_name="a", channel_id="C", request_id="rh", command_text="replay",
                       plan={"hash": "8f2c", "prev_hash": "x"}, result=None)
    out = io.StringIO()
    await export_jsonl(trail, out)
    assert verify_lines(out.getvalue().split("\n"))[0].ok


async def test_verify_file_on_the_cli_reads_bytes_and_exits_1_on_garbage(trail: AuditLog, state_db: str, tmp_path: Path) -> None:
    await fill_odd(trail)
    path = tmp_path / "e.jsonl"
    env = {**os.environ, "DATABASE_URL": state_db}
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "export", "-o", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    data = path.read_bytes()
    assert data.count(b"\n") == 3 * len(ODD_PLANS) and data.startswith(b'{"hash":"')
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "verify", "--file", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and f"OK: {3 * len(ODD_PLANS)} rows" in proc.stdout, (proc.stdout, proc.stderr)
    path.write_bytes(data.replace(b"\n", b"\n\x00\x01garbage\n", 1))
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "verify", "--file", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "BROKEN" in proc.stdout and "not an export line" in proc.stdout, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fault", ["stall", "cut"])
async def test_a_database_that_stalls_or_drops_mid_read_fails_closed(trail: AuditLog, state_db: str, fault: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    await fill_odd(trail)
    proxy, url = await TcpProxy.for_url(state_db)
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(audit_log, "STALL_TIMEOUT", 1.0)
    real_copy = audit_log._Snapshot.copy

    def copy(self: audit_log._Snapshot, select: str, **kwargs: Any) -> Any:
        # connected, in the snapshot: now the database stops answering (or the connection drops)
        asyncio.run_coroutine_threadsafe(_fault(proxy, fault), loop).result(timeout=5)
        return real_copy(self, select, **kwargs)

    monkeypatch.setattr(audit_log._Snapshot, "copy", copy)
    try:
        for run in (lambda: audit_log.verify_chain(url, trusted=True),
                    lambda: audit_log.export_chain(url, io.BytesIO(), trusted=True), lambda: audit_log.csv_chain(url, io.BytesIO())):
            proxy.up()
            started = loop.time()
            with pytest.raises(BackendUnavailable) as err:
                await asyncio.to_thread(run)
            assert "opsbot database" in str(err.value)
            assert ("sent nothing for 1 s" in str(err.value)) if fault == "stall" else loop.time() - started < 5
            assert loop.time() - started < 10
    finally:
        proxy.up()
        await proxy.stop()


async def _fault(proxy: TcpProxy, fault: str) -> None:
    proxy.pause() if fault == "stall" else proxy.down()


async def test_every_statement_of_a_walk_is_bounded_not_only_its_copy(trail: AuditLog, state_db: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that stops answering between the walk's statements (its BEGIN and snapshot
    export, the checkpoints read, a row read again on the second connection) fails closed within
    the limit: psycopg's own waits have none."""
    await fill_odd(trail, rounds=1)
    proxy, url = await TcpProxy.for_url(state_db)
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(audit_log, "STALL_TIMEOUT", 1.0)
    try:
        snap = await asyncio.to_thread(audit_log._Snapshot, url)
        try:
            assert await asyncio.to_thread(snap.row, 1) is not None  # (opens the second connection)
            proxy.pause()
            for call in (lambda: snap.row(2), lambda: snap.query("SELECT * FROM audit_checkpoints")):
                started = loop.time()
                with pytest.raises(BackendUnavailable, match="did not answer within 1 s while the trail was read"):
                    await asyncio.wait_for(asyncio.to_thread(call), 10)  # (a hang fails, not hangs, the test)
                assert loop.time() - started < 3
        finally:
            snap.close()
        proxy.up()
        real_connect = audit_log._Bounded.connect
        made: list[Any] = []

        def connect(*args: Any, **kwargs: Any) -> Any:  # connected; then the database stops answering
            conn = real_connect(*args, **kwargs)
            made.append(conn)
            asyncio.run_coroutine_threadsafe(_fault(proxy, "stall"), loop).result(timeout=5)
            return conn

        monkeypatch.setattr(audit_log._Bounded, "connect", connect)
        for run in (lambda: audit_log.verify_chain(url, trusted=True), lambda: audit_log.csv_chain(url, io.BytesIO())):
            proxy.up()
            started = loop.time()
            with pytest.raises(BackendUnavailable, match=r"opsbot database.*did not answer within 1 s"):
                await asyncio.wait_for(asyncio.to_thread(run), 10)
            assert loop.time() - started < 3
            assert made and all(conn.closed for conn in made)  # (the snapshot's own, closed though it never was one)
    finally:
        proxy.up()
        await proxy.stop()


async def test_a_prune_racing_verify_never_looks_like_deleted_rows(trail: AuditLog) -> None:
    for _ in range(3):
        await fill_odd(trail, rounds=4)
        reports, cp = await asyncio.gather(asyncio.gather(*(trail.verify() for _ in range(3))),
                                           trail.prune(datetime.now(UTC) + timedelta(seconds=1)))
        assert cp is not None
        assert all(r.ok for r in reports), [r.summary() for r in reports]
    after = await trail.verify()
    assert after.ok and after.checked == 1  # the newest row is kept; the checkpoints chain the rest


async def test_a_row_read_again_comes_from_the_walks_own_snapshot(trail: AuditLog, state_db: str) -> None:
    await fill_odd(trail, rounds=1)
    snap = await asyncio.to_thread(audit_log._Snapshot, state_db)
    try:
        assert snap.snapshot  # exported (a savepoint around the export made PostgreSQL refuse it)
        mine = (await asyncio.to_thread(snap.query, "SELECT pg_current_snapshot()::text AS s"))[0]["s"]
        await trail.append(event="requested", actor_id="U1", actor_name="a", channel_id="C", request_id="late", command_text="x",
                           plan={"late": True}, result=None)
        row = await asyncio.to_thread(snap.row, len(ODD_PLANS) + 1)
        assert row is None  # appended after the snapshot: not in it
        assert snap.other is not None
        theirs = snap.other.execute("SELECT pg_current_snapshot()::text AS s").fetchone()
        assert theirs is not None and theirs["s"] == mine
    finally:
        snap.close()
