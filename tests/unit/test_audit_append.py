"""The one-statement audit append (migration 008): PostgreSQL's hash is Python's, byte for byte, for
any content; the chain's lock is taken by a transaction of one statement (never held while the
client works); many writers on many connections and processes still make one unbroken chain;
a spooled row racing itself is appended once; a database that is down is said so."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.adapters.audit_log import FIELDS, AuditLog, _hash_parts, audit_hash, audit_record
from bot.adapters.store import Store
from bot.domain import canonical_json
from bot.errors import BackendUnavailable
from bot.untrusted import storable
from tests.faults.proxy import TcpProxy

HOSTILE = [
    "", "plain", 'quote " and backslash \\ and slash /', "tab\tnewline\ncr\r", "\x00nul\x01\x1f\x7f",
    "é ü ß — « » ‘’ “”", "日本語の監査", "emoji 🚀🔥 and a ZWJ family 👩‍👩‍👧", "combining e\u0301", "\u2028\u2029 separators",
    "\ufeffBOM", "`#1` *fake* · hash `" + "0" * 64 + "`", "{\"seq\":1}", "<@U123> <!channel>", "x" * 5000,
]
_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=30)
                     | st.floats(allow_nan=False, allow_infinity=False, width=32),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                     max_leaves=12)


@pytest_asyncio.fixture
async def log(state_db: str) -> AsyncIterator[AuditLog]:
    store = Store(state_db, max_size=10)
    await store.open()
    yield AuditLog(store)
    await store.close()


def entry(text: str = "scale w 2", **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"event": "requested", "actor_id": "U_C", "actor_name": "carol", "channel_id": "C1",
                            "request_id": "r-1", "command_text": text, "plan": {"summary": text, "n": 1}, "result": None}
    return {**base, **over}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(record=st.fixed_dictionaries({k: _json for k in FIELDS if k not in ("at", "seq")}), seq=st.integers(1, 2**62),
       at=st.datetimes(timezones=st.just(UTC)))
def test_the_parts_python_sends_are_its_canonical_json(record: dict[str, Any], seq: int, at: datetime) -> None:
    head, mid = _hash_parts(record)
    full = audit_record({**record, "seq": seq, "at": at})
    assert head + canonical_json(full["at"]) + mid + str(seq) + "}" == canonical_json(full)


async def test_postgresql_hashes_hostile_content_as_python_does(log: AuditLog) -> None:
    for i, raw in enumerate(HOSTILE):
        text = storable(raw)  # as Audit.record stores it (PostgreSQL text holds no NUL)
        plan = {"summary": text, text[:20] or "k": [text, i, 1.5, 1e-7, True, None], "nested": {"z": text, "a": {"b": []}}}
        row = await log.append(**entry(text, actor_name=text, channel_id=text[:50], request_id=text or None, plan=plan,
                                       result={"message": text, "big": 2**53, "float": 123456789.125}))
        stored = (await log.rows())[-1]
        assert stored["hash"] == row["hash"] == audit_hash(stored["prev_hash"], audit_record(stored)), text
        assert audit_hash(row["prev_hash"], audit_record(row)) == row["hash"]
    report = await log.verify()
    assert report.ok and report.checked == len(HOSTILE), report.summary()


async def test_the_chain_goes_on_from_a_pruning_checkpoint(log: AuditLog, state_db: str) -> None:
    for _ in range(3):
        await log.append(**entry())
    cp = await log.prune(datetime.now(UTC))  # keeps the newest row
    assert cp is not None and cp["upto_seq"] == 2
    row = await log.append(**entry())
    assert row["seq"] == 4 and (await log.verify()).ok


async def test_the_lock_is_taken_by_a_transaction_of_one_statement(log: AuditLog, state_db: str) -> None:
    """While another session holds the chain's lock, what waits is the append's one statement (no
    earlier statement of its transaction holds anything), and once it has the lock nothing after it
    waits for the client (autocommit: the statement's end is the commit)."""
    with psycopg.connect(state_db, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(658711)")
        task = asyncio.create_task(log.append(**entry()))
        waiting: tuple[Any, ...] | None = None
        for _ in range(200):
            waiting = holder.execute(
                """SELECT query, state FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'""").fetchone()
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting is not None, "the append never waited for the held lock"
        query, state = waiting
        assert "audit_append(" in query and state == "active", waiting  # the append itself waits: it holds nothing yet
        assert not task.done()
        holder.execute("SELECT pg_advisory_unlock(658711)")
    row = await asyncio.wait_for(task, 30)
    assert row["seq"] == 1
    with psycopg.connect(state_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND state LIKE 'idle in transaction%'").fetchone() == (0,)


_WRITER = """
import asyncio, sys
from bot.adapters.store import Store
from bot.adapters.audit_log import AuditLog
async def main():
    store = Store(sys.argv[1], max_size=4); await store.open(); log = AuditLog(store)
    async def one(i):
        await log.append(event='requested', actor_id=sys.argv[2], actor_name='', channel_id='C', request_id=f'{sys.argv[2]}-{i}',
                         command_text='scale w ' + str(i), plan={'i': i}, result=None, post=i % 2 == 0)
    await asyncio.gather(*(one(i) for i in range(int(sys.argv[3]))))
    await store.close()
asyncio.run(main())
"""


async def test_many_writers_on_many_connections_make_one_unbroken_chain(log: AuditLog, state_db: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, state_db, f"P{n}", "150"]) for n in range(3)]
    idle_in_transaction: list[Any] = []

    def watch() -> None:  # what the issue saw: lock holders "idle in transaction", waiting on Python
        with psycopg.connect(state_db, autocommit=True) as conn:
            while any(p.poll() is None for p in procs):
                idle_in_transaction.extend(conn.execute(
                    "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%'").fetchall())

    watcher = asyncio.create_task(asyncio.to_thread(watch))
    await asyncio.gather(*(log.append(**entry(f"in-process {i}", request_id=f"L-{i}")) for i in range(150)))
    assert [await asyncio.to_thread(p.wait, 120) for p in procs] == [0, 0, 0]
    await watcher
    assert idle_in_transaction == []
    rows = await log.rows()
    assert [r["seq"] for r in rows] == list(range(1, 601))  # no gaps, no duplicates
    assert len({r["prev_hash"] for r in rows}) == 600  # no fork: no two rows hang off one predecessor
    assert all(a["at"] <= b["at"] for a, b in itertools.pairwise(rows))  # taken under the lock
    report = await log.verify()
    assert report.ok and report.checked == 600, report.summary()
    with psycopg.connect(state_db) as conn:  # the outbox got exactly the rows asked to be posted
        outbox = conn.execute("SELECT count(*) FROM audit_outbox").fetchone()
    assert outbox == (150 + 3 * 75,)


async def test_a_spooled_row_drained_twice_at_once_is_appended_once(log: AuditLog) -> None:
    spooled = entry(result={"spooled": {"id": "sp-1", "why": "db down"}})
    got = await asyncio.gather(*(log.append_once(**spooled) for _ in range(8)))
    assert sorted(got) == [False] * 7 + [True]
    assert len(await log.rows()) == 1 and (await log.verify()).ok


async def test_a_database_that_is_down_is_said_so(state_db: str) -> None:
    proxy, url = await TcpProxy.for_url(state_db)
    store = Store(url, max_size=1)
    await store.open()
    try:
        assert (await AuditLog(store).append(**entry()))["seq"] == 1
        proxy.down()
        with pytest.raises(BackendUnavailable, match="opsbot database"):
            await AuditLog(store).append(**entry())
    finally:
        await store.close()
        await proxy.stop()
