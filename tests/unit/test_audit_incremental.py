"""`opsbot audit verify --incremental FILE` (issue 13, item 4: "verify incrementally from the last
verified checkpoint"): only the rows after the one the last verify ended at, once that row is found
unchanged; where it ended is kept in FILE, outside the database. Real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.adapters.audit_log import AuditLog
from bot.cli import _verify_state
from bot.errors import ConfigError
from tests.unit.test_audit_chain import tamper
from tests.unit.test_audit_scale import ODD_PLANS, fill_odd

N = 3 * len(ODD_PLANS)  # rows of fill_odd(rounds=3)


def cli(state_db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", "audit", "verify", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DATABASE_URL": state_db})


async def test_only_the_new_rows_are_walked_and_where_it_ended_is_saved(trail: AuditLog, state_db: str, tmp_path: Path) -> None:
    await fill_odd(trail)
    state = tmp_path / "verified.json"
    first = cli(state_db, "--incremental", str(state))
    assert first.returncode == 0 and f"OK: {N} rows, seq 1..{N}, chain intact" in first.stdout, first.stdout + first.stderr
    saved = json.loads(state.read_text())
    rows = await trail.rows()
    assert saved["seq"] == N and saved["hash"] == rows[-1]["hash"]
    await fill_odd(trail, rounds=1)
    again = cli(state_db, "--incremental", str(state))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"OK: {len(ODD_PLANS)} rows, seq {N + 1}..{N + len(ODD_PLANS)}, chain intact (the rows after seq {N}" in again.stdout
    assert json.loads(state.read_text())["seq"] == N + len(ODD_PLANS)
    idle = cli(state_db, "--incremental", str(state))
    assert idle.returncode == 0 and f"OK: no new rows after seq {N + len(ODD_PLANS)}" in idle.stdout, idle.stdout


async def test_the_row_it_ended_at_must_be_unchanged_and_new_rows_are_checked(trail: AuditLog, state_db: str) -> None:
    await fill_odd(trail)
    full = await trail.verify()
    assert full.ok and full.last_seq == N and full.last_hash is not None
    resume = (N, full.last_hash)
    await fill_odd(trail, rounds=1)
    tamper(state_db, f"UPDATE audit_events SET command_text = 'scale w 99' WHERE seq = {N + 2}")
    report = await trail.verify(resume=resume)
    assert not report.ok and report.broken_at == N + 2 and report.checked == 1, report.summary()
    # An edit before the row it ended at is not walked again: that is the full verify's job.
    tamper(state_db, "UPDATE audit_events SET command_text = 'scale w 98' WHERE seq = 3")
    assert (await trail.verify(resume=(N + 1, (await trail.rows())[N]["hash"]))).broken_at == N + 2
    assert (await trail.verify()).broken_at == 3
    # The row it ended at, rewritten or gone
    tamper(state_db, f"UPDATE audit_events SET hash = repeat('a', 64) WHERE seq = {N}")
    report = await trail.verify(resume=resume)
    assert not report.ok and report.broken_at == N and "not the one verified last time" in report.problem, report.summary()
    tamper(state_db, f"DELETE FROM audit_events WHERE seq = {N}")
    report = await trail.verify(resume=resume)
    assert not report.ok and report.broken_at == N and "missing" in report.problem, report.summary()
    # a state that points past the end (forged, or from another database)
    report = await trail.verify(resume=(10**12, "b" * 64))
    assert not report.ok and report.broken_at == 10**12 and "missing" in report.problem


async def test_a_prune_past_the_row_it_ended_at_walks_from_the_checkpoint(trail: AuditLog, state_db: str) -> None:
    await fill_odd(trail)
    full = await trail.verify()
    assert full.last_hash is not None
    await fill_odd(trail, rounds=1)
    cp = await trail.prune(datetime.now(UTC) + timedelta(seconds=1))
    assert cp is not None and cp["upto_seq"] > N
    report = await trail.verify(resume=(N, full.last_hash))
    assert report.ok and report.resumed_after is None and report.checked == 1, report.summary()
    # resuming exactly at the checkpoint: its hash must be the one the checkpoint keeps
    assert (await trail.verify(resume=(cp["upto_seq"], cp["last_hash"]))).ok
    bad = await trail.verify(resume=(cp["upto_seq"], "c" * 64))
    assert not bad.ok and "checkpoint" in bad.problem


@pytest.mark.parametrize("content", [
    b"", b"garbage", b"\x00\x01\x02", b'{"seq": 5}', b'{"seq": "5", "hash": "' + b"a" * 64 + b'"}',
    b'{"seq": true, "hash": "' + b"a" * 64 + b'"}', b'{"seq": -1, "hash": "' + b"a" * 64 + b'"}',
    b'{"seq": 5, "hash": "' + b"A" * 64 + b'"}', ('{"seq": 5, "hash": "' + "а" * 64 + '"}').encode(),  # Cyrillic а
    b'{"seq": 5, "hash": "' + b"a" * 64 + b'", "pad": "' + b"x" * 5000 + b'"}', b"[5]",
])
def test_a_state_file_that_is_not_one_is_refused_with_what_to_do(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"is not an opsbot verify state .*delete it to verify the whole chain again"):
        _verify_state(str(path))


async def test_the_cli_refuses_a_bad_state_and_fails_closed_with_the_database_down(trail: AuditLog, state_db: str, tmp_path: Path) -> None:
    await fill_odd(trail)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x00not json")
    proc = cli(state_db, "--incremental", str(bad))
    assert proc.returncode == 2 and "not an opsbot verify state" in proc.stderr and "OK" not in proc.stdout, proc.stderr
    good = tmp_path / "good.json"
    assert cli(state_db, "--incremental", str(good)).returncode == 0
    before = good.read_bytes()
    down = subprocess.run([sys.executable, "-m", "bot", "audit", "verify", "--incremental", str(good)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"})
    assert down.returncode == 1 and "database" in down.stderr.lower() and "OK" not in down.stdout, (down.stdout, down.stderr)
    assert good.read_bytes() == before  # nothing saved


async def test_two_runs_at_once_leave_a_whole_state(trail: AuditLog, state_db: str, tmp_path: Path) -> None:
    await fill_odd(trail)
    state = tmp_path / "state.json"

    async def run() -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "audit", "verify", "--incremental", str(state),
                                                    env={**os.environ, "DATABASE_URL": state_db},
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return await proc.wait()

    assert await asyncio.gather(run(), run(), run()) == [0, 0, 0]
    assert _verify_state(str(state)) == (N, (await trail.rows())[-1]["hash"])
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary file left
