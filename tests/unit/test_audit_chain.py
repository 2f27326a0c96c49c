"""The audit trail in real PostgreSQL: one valid chain under concurrent writers, tampering found at
the right row, a bot role that cannot rewrite history, export → verify, pruning that keeps the rest
verifiable, and no secrets in the record."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from bot.adapters import audit_log
from bot.adapters.audit_log import CANON_CHECK, CANON_CONSTRAINT, AuditLog, audit_record, verify_rows
from bot.adapters.store import Store
from bot.audit import Audit, secret_values
from bot.domain import Actor, UserId, canonical_json
from tests.conftest import fresh_db

CAROL = Actor(UserId("U_C"), "carol")
PLAN = {"target": "deployment/p/n/w", "environment": "p", "summary": "w: 1 → 2", "command": "scale"}


@pytest_asyncio.fixture
async def log(state_db: str) -> AsyncIterator[AuditLog]:
    store = Store(state_db, max_size=10)
    await store.open()
    yield AuditLog(store)
    await store.close()


async def fill(log: AuditLog, n: int, writer: str = "w") -> None:
    for i in range(n):
        await log.append(event="requested", actor_id=CAROL.user_id, actor_name=CAROL.name, channel_id="C",
                         request_id=f"{writer}-{i}", command_text="scale w 2", plan=PLAN, result={"i": i})


def tamper(url: str, *statements: str, constraint: str = "readd-not-valid") -> None:
    """As the superuser, with the append-only trigger and migration 009's CHECK (the columns say what
    ``canon`` says) out of the way: what an attacker with the keys could do. Afterwards the CHECK is
    put back as well as it can be without failing on the edited rows (``constraint``): NOT VALID,
    replaced by one that checks nothing, or left dropped ("dropped"); "untouched" leaves it alone."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        if constraint != "untouched":
            conn.execute(f"ALTER TABLE audit_events DROP CONSTRAINT {CANON_CONSTRAINT}")
        for s in statements:
            conn.execute(s)
        if constraint == "readd-not-valid":
            conn.execute(f"ALTER TABLE audit_events ADD CONSTRAINT {CANON_CONSTRAINT} CHECK ({CANON_CHECK}) NOT VALID")
        elif constraint == "replaced":
            conn.execute(f"ALTER TABLE audit_events ADD CONSTRAINT {CANON_CONSTRAINT} CHECK (canon IS NULL OR length(canon) > 0)")
        conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")


async def test_two_concurrent_writers_make_one_valid_chain(log: AuditLog) -> None:
    await asyncio.gather(fill(log, 500, "a"), fill(log, 500, "b"))
    rows = await log.rows()
    assert [r["seq"] for r in rows] == list(range(1, 1001))
    report = await log.verify()
    assert report.ok and report.checked == 1000, report.summary()


async def test_two_processes_appending_at_once_make_one_valid_chain(state_db: str, log: AuditLog) -> None:
    # Two bot replicas are two processes with their own pools.
    code = ("import asyncio,sys; from bot.adapters.store import Store; from bot.adapters.audit_log import AuditLog;"
            "\n"
            "async def m():\n s=Store(sys.argv[1]); await s.open(); l=AuditLog(s)\n"
            " for i in range(200): await l.append(event='requested', actor_id=sys.argv[2], actor_name='', channel_id='C',"
            " request_id=None, command_text='x', plan=None, result=None)\n await s.close()\nasyncio.run(m())")
    procs = [subprocess.Popen([sys.executable, "-c", code, state_db, f"U{n}"]) for n in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    report = await log.verify()
    assert report.ok and report.checked == 400, report.summary()


@pytest.mark.parametrize(("attack", "statements", "broken_at", "problem"), [
    ("edit a row", ["UPDATE audit_events SET command_text = 'scale w 20' WHERE seq = 42"], 42, "content does not match its hash"),
    ("edit and re-hash a row", ["UPDATE audit_events SET actor_id = 'U_X', hash = 'f' || substr(hash, 2) WHERE seq = 42"], 42,
     "content does not match"),
    ("delete a row", ["DELETE FROM audit_events WHERE seq = 42"], 42, "row 42 missing"),
    ("delete the newest rows", ["DELETE FROM audit_events WHERE seq > 95"], None, ""),  # see below: caught by the channel copy
    ("swap two rows", ["UPDATE audit_events SET seq = -10 WHERE seq = 10", "UPDATE audit_events SET seq = 10 WHERE seq = 11",
                       "UPDATE audit_events SET seq = 11 WHERE seq = -10"], 10, "does not link to row 9"),
])
async def test_tampering_is_found_at_the_right_row(log: AuditLog, state_db: str, attack: str, statements: list[str],
                                                   broken_at: int | None, problem: str) -> None:
    await fill(log, 100)
    assert (await log.verify()).ok
    tamper(state_db, *statements)
    report = await log.verify()
    if broken_at is None:
        # Truncating the tail leaves a valid (shorter) chain: only a copy made before (the audit
        # channel, an export) can show it. That is why every hash is posted.
        assert report.ok and report.last_seq == 95
        return
    assert not report.ok and report.broken_at == broken_at, report.summary()
    assert problem in report.problem
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "verify"], capture_output=True, text=True,
                          env={**os.environ, "DATABASE_URL": state_db})
    assert proc.returncode == 1 and f"BROKEN at seq {broken_at}" in proc.stdout


async def test_the_bots_role_cannot_update_or_delete(pg_admin: str, log: AuditLog) -> None:
    url = fresh_db(pg_admin)
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS opsbot_app_t")
        conn.execute("CREATE ROLE opsbot_app_t LOGIN")
    proc = subprocess.run([sys.executable, "-m", "bot", "migrate", "--app-role", "opsbot_app_t"], capture_output=True, text=True,
                          env={**os.environ, "DATABASE_URL": url})
    assert proc.returncode == 0, proc.stderr
    app_url = url.replace("postgres@", "opsbot_app_t@")
    store = Store(app_url, max_size=2)
    await store.open()
    try:
        await fill(AuditLog(store), 3)  # appending works for the bot's role
        # and so does verify, on its fast path (the constraint probe needs only a temporary table)
        assert await audit_log.canon_trusted(store) == (True, "")
        assert (await AuditLog(store).verify()).ok
    finally:
        await store.close()
    with psycopg.connect(app_url, autocommit=True) as conn:
        for statement in ("UPDATE audit_events SET actor_id = 'x'", "DELETE FROM audit_events", "TRUNCATE audit_events",
                          "UPDATE audit_checkpoints SET rows_pruned = 0", "ALTER TABLE audit_events DISABLE TRIGGER ALL"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM audit_events").fetchone() == (3,)


async def test_export_then_verify_round_trips(log: AuditLog, state_db: str, tmp_path: Path) -> None:
    await fill(log, 30)
    env = {**os.environ, "DATABASE_URL": state_db}
    out = tmp_path / "export.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "export", "--since", "1d", "--output", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 30 and {"hash", "prev_hash", "seq", "plan"} <= set(json.loads(lines[0]))
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "verify", "--file", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "OK: 30 rows, seq 1..30" in proc.stdout
    # A range of it verifies on its own too, anchored at its first prev_hash.
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[10:20]) + "\n")
    assert verify_rows([json.loads(x) for x in lines[10:20]], prev_hash=None, start_seq=None).ok
    # One edited value in the file is found.
    edited = json.loads(lines[7])
    edited["command_text"] = "scale w 200"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:7], json.dumps(edited), *lines[8:]]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "verify", "--file", str(bad)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "BROKEN at seq 8" in proc.stdout
    csv_out = subprocess.run([sys.executable, "-m", "bot", "audit", "export", "--format", "csv"], capture_output=True, text=True, env=env)
    assert csv_out.stdout.splitlines()[0].startswith("seq,at,event,actor_id") and len(csv_out.stdout.splitlines()) == 31


async def test_prune_keeps_what_remains_verifiable(log: AuditLog, state_db: str) -> None:
    await fill(log, 20)
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await fill(log, 5, "late")
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", "prune", "--before", cutoff.isoformat()], capture_output=True,
                          text=True, env={**os.environ, "DATABASE_URL": state_db})
    assert proc.returncode == 0, proc.stderr
    assert "pruned 20 rows up to seq 20" in proc.stdout
    report = await log.verify()
    assert report.ok and (report.first_seq, report.last_seq) == (21, 25), report.summary()
    await fill(log, 2, "after")  # the chain goes on from the checkpoint
    assert [r["seq"] for r in await log.rows()][-1] == 27 and (await log.verify()).ok
    # A forged checkpoint is found.
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_append_only")
        conn.execute("UPDATE audit_checkpoints SET rows_pruned = 3")
    report = await log.verify()
    assert not report.ok and "checkpoint up to 20 was altered" in report.problem
    # Deleting rows no checkpoint covers stays refused, even in a prune session.
    with psycopg.connect(state_db) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT set_config('opsbot.prune_upto', '27', true)")
        conn.execute("DELETE FROM audit_events WHERE seq = 25")


async def test_secrets_never_reach_the_record(log: AuditLog) -> None:
    secrets = secret_values(["xoxb-123-secret-token", "postgresql://opsbot:hunter2pw@db:5432/opsbot", "redis://:r3dispw@cache:6379/0"])
    audit = Audit(log, audit_channel=None, secrets=secrets)
    await audit.record("failed", actor=CAROL, text="scale w 2 --reason 'token xoxb-123-secret-token leaked'",
                       plan={**PLAN, "password": "pw-xyz", "details": ["connect to postgresql://opsbot:hunter2pw@db:5432/opsbot"]},
                       result={"error": "auth failed for redis://:r3dispw@cache:6379/0", "api_token": "abc"})
    dumped = json.dumps(await log.rows(), default=str)
    for secret in ("xoxb-123-secret-token", "hunter2pw", "r3dispw", '"abc"', "pw-xyz"):
        assert secret not in dumped
    assert dumped.count("[redacted]") >= 5


# ------------------------------------------------------------------ canon (migration 009)

async def test_each_new_row_keeps_the_exact_text_its_hash_covers(log: AuditLog, state_db: str) -> None:
    await fill(log, 3)
    with psycopg.connect(state_db) as conn:
        rows = conn.execute("SELECT seq, prev_hash, hash, canon FROM audit_events ORDER BY seq").fetchall()
    stored = await log.rows()
    for (seq, prev, digest, canon), row in zip(rows, stored, strict=True):
        assert canon == canonical_json(audit_record(row)), seq
        assert hashlib.sha256((prev + canon).encode()).hexdigest() == digest


async def test_verify_hashes_canon_without_re_encoding_and_re_derives_rows_without_it(
        log: AuditLog, state_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await fill(log, 20)
    tamper(state_db, "UPDATE audit_events SET canon = NULL WHERE seq IN (3, 4, 17)", constraint="untouched")  # rows from before 009
    reencoded: list[str | None] = []
    real = audit_log._Reencode.__call__

    def counting(self: Any, text: str | None) -> str:
        reencoded.append(text)
        return real(self, text)

    monkeypatch.setattr(audit_log._Reencode, "__call__", counting)
    assert (await audit_log.canon_trusted(log.store)) == (True, "")
    report = await log.verify()
    assert report.ok and report.checked == 20, report.summary()
    assert len(reencoded) == 2 * 3  # plan and result of the three rows without canon, and of no other


async def test_the_columns_cannot_be_changed_while_the_canon_check_stands(log: AuditLog, state_db: str) -> None:
    await fill(log, 3)
    with pytest.raises(psycopg.errors.CheckViolation):
        tamper(state_db, "UPDATE audit_events SET command_text = 'scale w 20' WHERE seq = 2", constraint="untouched")
    with pytest.raises(psycopg.errors.CheckViolation):
        tamper(state_db, "UPDATE audit_events SET plan = plan || '{\"n\": 2.0}' WHERE seq = 2", constraint="untouched")
    with pytest.raises(psycopg.errors.CheckViolation):  # the scale of a number counts: 2.0 is not 2
        tamper(state_db, "UPDATE audit_events SET canon = replace(canon, '\"i\":1', '\"i\":1.0') WHERE seq = 2", constraint="untouched")
    assert (await log.verify()).ok


@pytest.mark.parametrize("constraint", ["readd-not-valid", "replaced", "dropped"])
@pytest.mark.parametrize(("edit", "found"), [
    ("UPDATE audit_events SET plan = jsonb_set(plan, '{summary}', '\"w: 3 → 30\"') WHERE seq = 7", True),
    ("UPDATE audit_events SET command_text = 'scale w 30', canon = replace(canon, 'scale w 2', 'scale w 30') WHERE seq = 7", True),
    # canon alone: verify no longer trusts it and reads the columns, which are intact: nothing to report
    ("UPDATE audit_events SET canon = replace(canon, 'scale w 2', 'scale w 30') WHERE seq = 7", False),
])
async def test_an_edit_behind_a_dropped_or_weakened_check_is_found(log: AuditLog, state_db: str, constraint: str, edit: str,
                                                                   found: bool) -> None:
    await fill(log, 12)
    tamper(state_db, edit, constraint=constraint)
    trusted, why = await audit_log.canon_trusted(log.store)
    assert not trusted and why, why
    report = await log.verify()
    if found:
        assert not report.ok and report.broken_at == 7 and "content does not match" in report.problem, report.summary()
    else:
        assert report.ok and report.checked == 12, report.summary()


async def test_columns_and_canon_edited_together_are_found_with_the_check_standing(log: AuditLog, state_db: str) -> None:
    await fill(log, 12)
    tamper(state_db, "UPDATE audit_events SET command_text = 'scale w 30', canon = replace(canon, 'scale w 2', 'scale w 30') "
                     "WHERE seq = 7", constraint="untouched")
    assert (await audit_log.canon_trusted(log.store))[0]
    report = await log.verify()
    assert not report.ok and report.broken_at == 7 and "content does not match" in report.problem, report.summary()
