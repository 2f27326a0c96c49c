"""The audit channel's headlines (issue 13): a poster round finds the threads whose headline is
behind from a partial index, not by asking every thread ever posted for its newest row (that grew
with the whole history: 1.3 s a round at 30,000 threads); marking rows posted moves their thread
by the statement's trigger, never backwards, also when two replicas mark at once and when an
older opsbot (a rolling upgrade) marks them its own way; a thread behind by rows since pruned is
not behind any more; migration 013 fills the column in for threads from before it."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from importlib import resources

import psycopg
import pytest

from bot.adapters.audit_log import STALE_HEADLINES, AuditLog
from bot.adapters.store import Store
from bot.errors import BackendUnavailable


async def steps(log: AuditLog, request_id: str, n: int) -> list[int]:
    return [int((await log.append(event="requested", actor_id="U1", actor_name="a", channel_id="C1", request_id=request_id,
                                  command_text="scale w 2", plan={"i": i}, result=None))["seq"]) for i in range(n)]


async def test_marking_rows_posted_puts_their_thread_behind_until_its_headline_shows_them(trail: AuditLog) -> None:
    a, b = await steps(trail, "r-a", 3), await steps(trail, "r-b", 2)
    await trail.mark_posted(a[0], "100.1")  # posted before its thread is saved: the thread starts from it
    await trail.save_threads("CA", "100.1", None, [("r-a", a[0])])
    assert await trail.stale_headlines() == []  # its headline shows its newest posted row
    await trail.mark_posted_many([a[1], a[2], b[0]], "100.2")  # r-b has no thread yet: nothing to redraw for it
    assert [(r["request_id"], r["seq"]) for r in await trail.stale_headlines()] == [("r-a", a[2])]
    members = await trail.members_of([("CA", "100.1")])
    assert [(m["request_id"], m["seq"], m["row"]["seq"]) for m in members[("CA", "100.1")]] == [("r-a", a[2], a[2])]
    await trail.headlines_shown([("r-a", a[1])])  # an older redraw does not count as the newest
    assert [r["seq"] for r in await trail.stale_headlines()] == [a[2]]
    await trail.headlines_shown([("r-a", a[2])])
    await trail.save_thread("r-b", "CA", "100.3", None)  # saved after its first row was posted
    assert [(r["request_id"], r["seq"]) for r in await trail.stale_headlines()] == [("r-b", b[0])]
    await trail.save_threads("CA", "100.3", None, [("r-b", b[0])])
    assert await trail.stale_headlines() == []
    await trail.mark_posted(b[1], "100.4")
    await trail.save_threads("CA", "100.9", None, [("r-b", b[1])])  # another message: not this thread's, nothing changes
    assert [(r["request_id"], r["ts"], r["seq"]) for r in await trail.stale_headlines()] == [("r-b", "100.3", b[1])]


async def test_two_replicas_marking_at_once_never_move_a_thread_backwards(trail: AuditLog, state_db: str) -> None:
    seqs = await steps(trail, "r-x", 40)
    await trail.save_thread("r-x", "CA", "1.1", None)
    other = Store(state_db, max_size=4)
    await other.open()
    try:
        mine, theirs = seqs[::2], seqs[1::2]
        # newest first on one side, oldest first on the other, in small overlapping batches
        await asyncio.gather(*(trail.mark_posted_many(mine[i:i + 3][::-1], f"2.{i}") for i in range(len(mine) - 1, -1, -3)),
                             *(AuditLog(other).mark_posted_many(theirs[i:i + 2], f"3.{i}") for i in range(0, len(theirs), 2)))
    finally:
        await other.close()
    assert [r["seq"] for r in await trail.stale_headlines()] == [max(seqs)]


async def test_rows_marked_by_an_older_replica_move_the_thread_too(trail: AuditLog, state_db: str) -> None:
    """During a rolling upgrade, a replica of the previous opsbot marks rows posted with its own
    statements, one row at a time or many: the trigger moves their thread all the same."""
    a = await steps(trail, "r-a", 4)
    await trail.save_threads("CA", "5.1", None, [("r-a", a[0])])
    with psycopg.connect(state_db, autocommit=True) as conn:  # (the statements of bot/adapters/audit_log.py before 013)
        conn.execute("UPDATE audit_outbox SET posted_ts = %s, uncertain = false, last_error = NULL WHERE seq = %s", ("5.2", a[1]))
        assert [(r["request_id"], r["seq"]) for r in await trail.stale_headlines()] == [("r-a", a[1])]
        conn.execute("UPDATE audit_outbox SET posted_ts = %s, uncertain = false, last_error = NULL WHERE seq = ANY(%s)",
                     ("5.3", [a[3], a[2]]))
        conn.execute("UPDATE audit_outbox SET attempts = attempts + 1 WHERE seq = %s", (a[0],))  # (not a post: nothing moves)
        conn.execute("UPDATE audit_outbox SET posted_ts = NULL WHERE seq = %s", (a[3],))  # (nor backwards)
    assert [(r["request_id"], r["seq"]) for r in await trail.stale_headlines()] == [("r-a", a[3])]


async def test_a_thread_behind_by_rows_since_pruned_is_not_behind_any_more(trail: AuditLog) -> None:
    """Pruned rows cannot be drawn: their thread must not stay behind, or the oldest 50 such would
    hold every other headline back for good (a round reads the 50 oldest behind)."""
    a, b = await steps(trail, "r-a", 3), await steps(trail, "r-b", 2)
    await trail.save_threads("CA", "7.1", None, [("r-a", a[0]), ("r-b", b[0])])
    await trail.mark_posted_many([*a, *b], "7.2")
    assert {r["request_id"] for r in await trail.stale_headlines()} == {"r-a", "r-b"}
    newer = await steps(trail, "r-c", 1)
    await trail.mark_posted_many(newer, "7.3")
    assert await trail.prune(datetime.now(UTC) + timedelta(seconds=1))  # keeps the newest row (r-c's)
    assert await trail.stale_headlines() == []
    c = await steps(trail, "r-b", 1)  # a request's rows after the prune still put its thread behind
    await trail.mark_posted_many(c, "7.4")
    assert [(r["request_id"], r["seq"]) for r in await trail.stale_headlines()] == [("r-b", c[0])]


def test_a_round_reads_the_threads_behind_not_every_thread(state_db: str) -> None:
    """30,000 threads, 3 behind: the round's query reads those 3 from the partial index."""
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("""INSERT INTO audit_threads (request_id, channel, ts, headline_seq, posted_seq)
                        SELECT 'r-' || g, 'CA', g || '.1', 4 * g, 4 * g + (CASE WHEN g % 10000 = 7 THEN 2 ELSE 0 END)
                        FROM generate_series(1, 30000) g""")
        conn.execute("ANALYZE audit_threads")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, TIMING OFF) " + STALE_HEADLINES).fetchall())
        assert "audit_threads_behind" in plan and "Seq Scan" not in plan, plan
        assert [int(n) for n in re.findall(r"actual rows=(\d+)", plan)] == [3, 3], plan
        assert {r[0] for r in conn.execute(STALE_HEADLINES).fetchall()} == {"r-7", "r-10007", "r-20007"}


async def test_migration_013_fills_in_threads_from_before_it(trail: AuditLog, state_db: str) -> None:
    a, b = await steps(trail, "r-a", 3), await steps(trail, "r-b", 2)
    await trail.save_threads("CA", "1.1", None, [("r-a", a[0]), ("r-b", b[0])])
    await trail.mark_posted_many([*a, b[0]], "1.1")
    with psycopg.connect(state_db, autocommit=True) as conn:  # as a thread was before the column
        conn.execute("UPDATE audit_threads SET posted_seq = 0")
        assert conn.execute(STALE_HEADLINES).fetchall() == []
        conn.execute(resources.files("bot.migrations").joinpath("013_audit_posted_seq.sql").read_text())  # (idempotent)
        assert sorted(conn.execute("SELECT request_id, posted_seq FROM audit_threads").fetchall()) == [("r-a", a[2]), ("r-b", b[0])]
    assert [(r["request_id"], r["seq"]) for r in await trail.stale_headlines()] == [("r-a", a[2])]


async def test_with_the_database_down_a_round_says_so(trail: AuditLog, state_db: str) -> None:
    await trail.store.close()
    down = Store(state_db.replace(state_db.split("@")[1].split("/")[0], "127.0.0.1:1"), max_size=1, timeout=1.0)
    with pytest.raises(BackendUnavailable):
        await down.open()
        await AuditLog(down).stale_headlines()
    with pytest.raises(BackendUnavailable):
        await AuditLog(down).mark_posted_many([1], "1.1")
