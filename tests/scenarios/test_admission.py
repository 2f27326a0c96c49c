"""Admission control (issue 13): past the bound on commands in flight, a command is answered at
once, in its ack, that opsbot is busy, and the attempt is audited once as ``busy`` with what was
typed; never "unavailable" while the backends are healthy. A pool timeout says busy or down from
what happened during the wait. Each replica applies its own bound."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from typing import Any

import psycopg
import pytest

from bot.adapters.store import Store
from bot.config import Config
from bot.errors import BackendUnavailable, Busy, ConfigError
from bot.pipeline import Admission
from bot.runtime import Runtime
from bot.sandbox.servers import free_port
from bot.sandbox.slack_api import FakeSlack
from bot.settings import Settings
from tests.harness import Harness, slash_body

ALICE, BOTH = "U0ALICE", "U0BOTH"  # engineers in the Nova example


def _text(ack_body: str) -> str:
    """What the ack shows the person: Bolt sends a text-only ack as the plain body."""
    try:
        return str(json.loads(ack_body).get("text", "")) if ack_body else ""
    except ValueError:
        return ack_body


async def _busy_rows(bot: Harness) -> list[dict[str, Any]]:
    return [r for r in await bot.runtime.audit.log.rows() if r["event"] == "busy"]


def _busy_count(bot: Harness) -> float:
    return bot.runtime.metrics.registry.get_sample_value("opsbot_busy_total", {"why": "admission"}) or 0.0


async def test_commands_past_the_bound_are_told_busy_in_the_ack_and_each_audited_once(bot: Harness) -> None:
    bot.runtime.pipeline.admission = admission = Admission(limit=3, max_wait=None)
    held = [admission.enter() for _ in range(3)]  # three commands in flight that take their time
    assert held == [None, None, None]
    sample = bot.runtime.metrics.registry.get_sample_value  # what bench/incident_load.py scrapes over a run
    assert (sample("opsbot_admission_bound"), sample("opsbot_commands_in_flight")) == (3, 3)
    texts = [f"scale worker {n} --reason 'incident <!channel> #{n}'" for n in (4, 5, 6, 7, 8)]
    acks = await asyncio.gather(*(bot.slash(ALICE, t) for t in texts))
    assert [status for status, _ in acks] == [200] * 5
    answers = [_text(body) for _, body in acks]
    assert answers == [":hourglass: opsbot is busy (3 commands in flight), try again in 5 s. Nothing was done and nothing is "
                       "queued: send the command again then. opsbot's backends are fine; it is taking no more work at once "
                       "than it can finish."] * 5
    rows = await bot.eventually(lambda: _rows_if(bot, 5), what="5 busy audit rows")
    assert sorted(r["command_text"] for r in rows) == sorted(texts)  # what was typed, each once
    assert all(r["actor_id"] == ALICE and r["result"]["why"] == "admission" and r["result"]["in_flight"] == 3 for r in rows)
    assert _busy_count(bot) == 5
    assert not await bot.runtime.store.open_requests_of(ALICE, limit=10)  # nothing was opened
    assert not [r for r in bot.slack.responses if "unavailable" in r.get("text", "")]
    # once the work in flight is done, the same command is taken
    for _ in held:
        admission.leave()
    status, body = await bot.slash(ALICE, "scale worker 6")
    assert status == 200 and not _text(body)
    request = await bot.requested()
    assert request.text == "scale worker 6"
    # (the card is posted just before the command's work ends and it leaves the count)
    await bot.eventually(lambda: _true_if(admission.in_flight == 0), what="the command to leave admission")


async def _true_if(condition: bool) -> bool | None:
    return condition or None


async def _rows_if(bot: Harness, n: int) -> list[dict[str, Any]] | None:
    rows = await _busy_rows(bot)
    return rows if len(rows) >= n else None


async def test_a_real_burst_beyond_the_bound_gets_an_answer_and_one_audit_row_each(bot: Harness) -> None:
    bot.runtime.pipeline.admission = Admission(limit=4, max_wait=None)
    n = 60
    acks = await asyncio.gather(*(bot.slash([ALICE, BOTH][i % 2], "status worker") for i in range(n)))
    busy = [b for _, b in acks if "opsbot is busy" in _text(b)]
    served = n - len(busy)

    async def answers() -> list[dict[str, Any]] | None:
        got = [r for r in bot.slack.responses if "nova-worker" in r.get("text", "")]
        return got if len(got) >= served else None

    await bot.eventually(answers, timeout=60, what=f"{served} status answers")

    async def audited() -> list[dict[str, Any]] | None:
        rows = [r for r in await bot.runtime.audit.log.rows() if r["event"] in ("read", "busy")]
        return rows if len(rows) >= n else None

    rows = await bot.eventually(audited, timeout=60, what=f"{n} audit rows")
    assert len(rows) == n and sum(1 for r in rows if r["event"] == "busy") == len(busy)
    assert served >= 4 and bot.runtime.pipeline.admission.in_flight == 0
    assert not [r for r in bot.slack.responses if "unavailable" in r.get("text", "")]


async def test_busy_refusals_waiting_for_the_audit_trail_are_not_a_task_each(bot: Harness) -> None:
    """bench/rss.py's RSS growth: refusals came faster than their rows could be appended, and each
    waited as a task (with the Bolt listener awaiting it, ~4 KiB). They wait in one queue now."""
    bot.runtime.pipeline.admission = admission = Admission(limit=1, max_wait=None)
    assert admission.enter() is None  # the bound is full
    audit = bot.runtime.audit
    real_record, release = audit.record, asyncio.Event()

    async def slow_record(*args: Any, **kwargs: Any) -> dict[str, Any]:
        await release.wait()  # the trail is slower than the refusals
        return await real_record(*args, **kwargs)

    audit.record = slow_record  # type: ignore[method-assign]
    n = 200
    def tasks() -> int:  # (not counting the HTTP server's keep-alive connections)
        return sum(1 for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") != "RequestHandler.start")

    tasks_before = tasks()
    acks = await asyncio.gather(*(bot.post_signed(slash_body(bot.slack, ALICE, f"scale worker 6 --reason 'load #{i}'")) for i in range(n)))
    assert all("opsbot is busy" in _text(body) for _, body in acks)
    await asyncio.sleep(0.2)  # (what the acks left behind has run as far as it can)
    assert tasks() - tasks_before < 10  # was 200: one per refusal
    assert bot.runtime.pipeline.busy_pending == n - 1  # (the writer holds the first one)
    release.set()
    rows = await bot.eventually(lambda: _rows_if(bot, n), timeout=30, what=f"{n} busy rows")
    assert sorted(r["command_text"] for r in rows) == sorted(f"scale worker 6 --reason 'load #{i}'" for i in range(n))  # each once
    admission.leave()


async def test_busy_refusals_past_the_backlog_are_counted_in_one_row(bot: Harness) -> None:
    bot.runtime.pipeline.admission = admission = Admission(limit=1, max_wait=None)
    assert admission.enter() is None
    bot.runtime.pipeline.busy_backlog = 5
    audit = bot.runtime.audit
    real_record, release = audit.record, asyncio.Event()

    async def slow_record(*args: Any, **kwargs: Any) -> dict[str, Any]:
        await release.wait()
        return await real_record(*args, **kwargs)

    audit.record = slow_record  # type: ignore[method-assign]

    async def refuse(i: int) -> None:  # one after another: the queue's order is the order of the refusals
        _, body = await bot.post_signed(slash_body(bot.slack, ALICE, f"scale worker 6 --reason 'load #{i}'"))
        assert "opsbot is busy" in _text(body)

    for i in range(12):
        await refuse(i)
    # the writer took the first refusal off the queue and waits with it; 5 wait behind it, the rest are counted
    assert bot.runtime.pipeline.busy_pending == 6
    release.set()
    rows = await bot.eventually(lambda: _rows_if(bot, 7), timeout=30, what="7 busy rows")
    assert [r["command_text"] for r in rows[:6]] == [f"scale worker 6 --reason 'load #{i}'" for i in range(6)]
    summary = rows[6]
    assert summary["actor_id"] == "opsbot" and summary["command_text"] == ""
    assert summary["result"]["unrecorded"]["count"] == 6 and summary["result"]["unrecorded"]["backlog"] == 5
    assert summary["result"]["unrecorded"]["by_user"] == {ALICE: 6}  # who was refused stays on the record
    assert summary["result"]["unrecorded"]["first_attempted_at"] <= summary["result"]["unrecorded"]["last_attempted_at"]
    assert _busy_count(bot) == 12  # the metric counts every refusal
    admission.leave()


async def test_busy_refusals_are_counted_until_the_backlog_before_them_is_written(bot: Harness) -> None:
    """While the queue is full the refusals go into its last row, also once the writer has made
    room: a refusal queued after that row would cut the overload into rows of one or two."""
    bot.runtime.pipeline.admission = admission = Admission(limit=1, max_wait=None)
    assert admission.enter() is None
    bot.runtime.pipeline.busy_backlog = 3
    audit = bot.runtime.audit
    real_record, writes = audit.record, asyncio.Semaphore(0)

    async def slow_record(*args: Any, **kwargs: Any) -> dict[str, Any]:
        await writes.acquire()  # one row at a time, when the test says
        return await real_record(*args, **kwargs)

    audit.record = slow_record  # type: ignore[method-assign]

    async def refuse(i: int) -> None:
        _, body = await bot.post_signed(slash_body(bot.slack, ALICE, f"scale worker 6 --reason 'load #{i}'"))
        assert "opsbot is busy" in _text(body)

    for i in range(6):  # #0 taken by the writer, #1-#3 queued, #4 and #5 counted
        await refuse(i)
    for n in (1, 2):  # two rows written: the queue holds #3 and the count, room for two more
        writes.release()
        await bot.eventually(lambda n=n: _rows_if(bot, n), timeout=30, what=f"{n} busy rows")
    await refuse(6)  # still counted: the rows before the count are not all written
    for _ in range(10):
        writes.release()
    rows = await bot.eventually(lambda: _rows_if(bot, 5), timeout=30, what="5 busy rows")
    await asyncio.sleep(0.3)  # (no sixth row comes)
    rows = await _busy_rows(bot)
    assert [r["command_text"] for r in rows] == [f"scale worker 6 --reason 'load #{i}'" for i in range(4)] + [""]
    assert rows[4]["result"]["unrecorded"]["count"] == 3
    await refuse(7)  # the count is written: queued one by one again
    await bot.eventually(lambda: _rows_if(bot, 6), timeout=30, what="6 busy rows")
    assert (await _busy_rows(bot))[5]["command_text"] == "scale worker 6 --reason 'load #7'"
    admission.leave()


async def test_two_replicas_each_apply_their_own_bound(config: Config, slack: FakeSlack, state_db: str, redis_url: str,
                                                       kubeconfig: str, queue_prefix: str) -> None:
    a = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                            queue_prefix=queue_prefix)
    b = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                            queue_prefix=queue_prefix, with_worker=False)
    try:
        a.runtime.pipeline.admission = full = Admission(limit=2, max_wait=None)
        b.runtime.pipeline.admission = Admission(limit=2, max_wait=None)
        full.enter(), full.enter()  # replica a is at its bound; b is idle
        _, on_a = await a.slash(ALICE, "scale worker 7")
        _, on_b = await b.slash(ALICE, "scale worker 7")
        assert "opsbot is busy (2 commands in flight)" in _text(on_a)
        assert not _text(on_b)
        request = await b.requested()
        assert request.text == "scale worker 7"
        rows = await a.runtime.audit.log.rows()  # one database, one trail: a's refusal and b's request
        assert [r["event"] for r in rows if r["command_text"] == "scale worker 7"] == ["busy", "requested"]
    finally:
        await asyncio.wait_for(b.stop(), timeout=60)
        await asyncio.wait_for(a.stop(), timeout=60)


async def test_an_exhausted_pool_is_busy_a_hung_database_is_not(state_db: str) -> None:
    store = Store(state_db, min_size=1, max_size=1, timeout=0.35)
    await store.open()
    try:
        async def query(seconds: float) -> str:
            async with store.connection() as conn:
                await conn.execute("SELECT pg_sleep(%s)", (seconds,))
            return "served"

        # connections come and go (0.1 s each), there are just more requests than connections
        results = await asyncio.gather(*(query(0.1) for _ in range(12)), return_exceptions=True)
        busy = [r for r in results if isinstance(r, Busy)]
        assert busy and results.count("served") >= 2 and results.count("served") + len(busy) == 12
        assert str(busy[0]) == "opsbot is busy: all 1 connections to the opsbot database were in use for 0.35 s"
        # the one connection does not come back for the whole wait: that is a database not answering
        holder = asyncio.ensure_future(query(1.0))
        await asyncio.sleep(0.1)
        with pytest.raises(BackendUnavailable) as hung:
            await query(0)
        assert not isinstance(hung.value, Busy)
        assert str(hung.value) == ("the opsbot database is unavailable: it did not answer for 0.35 s on any of opsbot's "
                                   "1 connections")
        await holder
    finally:
        await store.close()


async def test_a_database_that_is_down_is_unavailable_not_busy() -> None:
    store = Store(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", min_size=0, max_size=2, timeout=0.5)
    await store.open()
    try:
        with pytest.raises(BackendUnavailable) as down:
            await store.ping()
        assert not isinstance(down.value, Busy)
        assert str(down.value) == "the opsbot database is unavailable: no connection could be made to it for 0.5 s"
    finally:
        await store.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(admission: Admission, clock: _Clock, *, n: int, took: float, gap: float = 0.01) -> None:
    """``n`` commands one after the other, each in flight ``took`` s, ``gap`` s apart."""
    for _ in range(n):
        assert admission.enter() is None
        clock.now += took
        admission.leave()
        clock.now += gap


def _batch(admission: Admission, clock: _Clock, *, n: int, took: float) -> None:
    """``n`` commands entering together, in flight ``took`` s, leaving together."""
    for _ in range(n):
        assert admission.enter() is None
    clock.now += took
    for _ in range(n):
        admission.leave()


def _stream(admission: Admission, clock: _Clock, *, seconds: float, took: float, tick: float = 0.01) -> None:
    """More commands than the bound for ``seconds`` s: a free place is taken as soon as there is
    one (checked every ``tick`` s and after each command leaves); each command is in flight ``took`` s."""
    leaving: collections.deque[float] = collections.deque()
    end = clock.now + seconds
    while clock.now < end:
        while admission.enter() is None:
            leaving.append(clock.now + took)
        while leaving and leaving[0] <= clock.now:
            leaving.popleft()
            admission.leave()
            while admission.enter() is None:
                leaving.append(clock.now + took)
        clock.now += tick
    while leaving:
        clock.now = max(clock.now, leaving.popleft())
        admission.leave()


def test_the_bound_shrinks_when_admitted_commands_are_slow_and_recovers_when_fast() -> None:
    clock = _Clock()
    admission = Admission(limit=100, max_wait=0.75, floor=10, window=2.0, decrease=0.8, clock=clock)
    # no measure yet: 20 (ADMISSION_INITIAL), no longer the pools' 100: a cold process given 150/s
    # took 100 at once, far more than finish within 0.75 s (bot/pipeline.py)
    assert admission.bound() == 20
    _run(admission, clock, n=50, took=0.1)
    assert admission.bound() == 20  # one at a time: a bound nobody uses does not grow (it grew to 100 on these)
    _batch(admission, clock, n=20, took=0.1)  # 20 at once, leaving together: it is full only for the first two to leave
    assert admission.bound() == 22
    _stream(admission, clock, seconds=0.25, took=0.1)  # kept full: slow start, +1 per fast command (doubles every 0.1 s)
    assert 80 <= admission.bound() < 100
    _stream(admission, clock, seconds=0.2, took=0.1)
    assert admission.bound() == 100  # never above the limit
    clock.now += 2.5  # the fast ones left the window
    _batch(admission, clock, n=10, took=1.0)  # p90 over the target: ×0.8 once, not once per command
    assert admission.bound() == 80
    _batch(admission, clock, n=10, took=1.0)  # a p90 later: ×0.8 again
    assert admission.bound() == 64
    for _ in range(20):
        _batch(admission, clock, n=10, took=1.0)
    assert admission.bound() == 10  # the floor, not fewer
    assert admission.retry_after() >= 1
    _batch(admission, clock, n=10, took=0.1)  # fast again, but the window's p90 is still slow: no growth yet
    assert admission.bound() == 10
    clock.now += 2.5  # the slow ones left the window
    _stream(admission, clock, seconds=2, took=0.1)  # after a decrease +1/bound per fast command (was +1): ~1 per 0.1 s
    assert 27 <= admission.bound() <= 31
    _stream(admission, clock, seconds=15, took=0.1)
    assert admission.bound() == 100


def test_past_the_bound_a_command_is_refused_with_a_sensible_retry_after() -> None:
    clock = _Clock()
    admission = Admission(limit=100, max_wait=0.75, floor=10, window=2.0, clock=clock)
    for _ in range(30):  # slow: down to the floor
        _batch(admission, clock, n=10, took=1.5)
    assert admission.bound() == 10  # ~13 finish in the 2 s window: 10 in flight are done in ~2 s
    for _ in range(10):
        assert admission.enter() is None
    load = admission.enter()
    assert load is not None and load.in_flight == 10 and load.limit == 10
    assert 1 <= load.retry_after <= 2
    assert admission.full() == load
    clock.now += 60  # nothing finished for a minute: no measure, a modest wait
    assert admission.retry_after() == 5


def test_slow_but_steady_latency_under_the_target_does_not_shrink_the_bound() -> None:
    """The collapse the earlier bound ("finished per second × MAX_WAIT") had: commands taking
    0.7 s (the database slower, not opsbot's CPU), 10 at a time, finish ~14 per second, which made
    its bound 10 and its throughput 10 ÷ 0.7; every one of them was answered within the target."""
    clock = _Clock()
    admission = Admission(limit=100, max_wait=0.75, floor=10, window=2.0, clock=clock)
    _stream(admission, clock, seconds=21, took=0.7)  # kept full, each command 0.7 s
    assert admission.bound() >= 45  # from 20: it grew (+1/bound per command: slow start ends at 0.7 s > half the target)


def test_without_a_target_the_bound_is_the_limit() -> None:
    clock = _Clock()
    admission = Admission(limit=3, max_wait=None, clock=clock)
    _run(admission, clock, n=20, took=5.0)
    assert admission.bound() == 3
    for _ in range(3):
        assert admission.enter() is None
    assert admission.enter() is not None
    with pytest.raises(ValueError):
        Admission(limit=0)
    with pytest.raises(ValueError):
        Admission(decrease=1.0)


# ---------------------------------------------------------------- the fast path (bot/runtime.py ``busy_ack``)

CAROL = "U0CAROL"  # an approver in the Nova example


def _count_dispatches(bot: Harness) -> list[str]:
    """Wraps Bolt's dispatch to list what reached it (a slash command's text, or a payload's type)."""
    seen: list[str] = []
    dispatch = bot.runtime.bolt.async_dispatch

    async def counting(req: Any) -> Any:
        body = req.body if isinstance(req.body, dict) else {}
        seen.append(str(body.get("text", body.get("type", ""))))
        return await dispatch(req)

    bot.runtime.bolt.async_dispatch = counting  # type: ignore[method-assign]
    return seen


async def test_past_the_bound_busy_is_answered_before_bolt_dispatches_and_audited_once(bot: Harness) -> None:
    bot.runtime.pipeline.admission = admission = Admission(limit=2, max_wait=None)
    seen = _count_dispatches(bot)
    assert admission.enter() is None and admission.enter() is None  # two commands in flight
    n = 40
    texts = [f"scale worker {4 + i % 9} --reason burst-{i}" for i in range(n)]
    acks = await asyncio.gather(*(bot.slash([ALICE, BOTH][i % 2], t) for i, t in enumerate(texts)))
    assert {status for status, _ in acks} == {200}
    assert all(_text(body).startswith(":hourglass: opsbot is busy (2 commands in flight), try again in 5 s.") for _, body in acks)
    assert seen == []  # none of them reached Bolt: the busy answers came from the fast path
    rows = await bot.eventually(lambda: _rows_if(bot, n), timeout=30, what=f"{n} busy rows")
    assert sorted(r["command_text"] for r in rows) == sorted(texts)  # each attempt audited exactly once
    assert {r["result"]["why"] for r in rows} == {"admission"} and _busy_count(bot) == n
    await asyncio.sleep(0.5)
    assert len(await _busy_rows(bot)) == n  # and not a second time by Bolt's listener
    assert not [r for r in bot.slack.responses if "unavailable" in r.get("text", "")]
    assert not bot.runtime.inflight  # the background recorders are done and no longer tracked
    # with room again, a command goes through Bolt and opens a request
    admission.leave(), admission.leave()
    status, body = await bot.slash(ALICE, "scale worker 6")
    assert status == 200 and not _text(body) and seen == ["scale worker 6"]
    assert (await bot.requested()).text == "scale worker 6"


async def test_a_click_while_admission_is_full_still_counts(bot: Harness) -> None:
    await bot.slash(ALICE, "scale worker 6")
    request = await bot.requested()
    bot.runtime.pipeline.admission = full = Admission(limit=1, max_wait=None)
    assert full.enter() is None  # full from here on
    _, busy = await bot.slash(BOTH, "scale worker 7")
    assert "opsbot is busy" in _text(busy)
    status, body = await bot.click(CAROL, request.id, "approve")
    assert status == 200 and "busy" not in body
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert "approved" in await bot.audit_events(request.id)


async def test_hostile_commands_on_the_fast_path_are_answered_as_ever_and_audited_once(bot: Harness) -> None:
    """While full, what the fast path cannot read goes to Bolt's listener, which answers and records it
    as before: a forged user id is `malformed`, an unknown command `invalid`; a look-alike of `/ops`
    is not opsbot's command at all; NUL and control characters never reach the audit row raw."""
    bot.runtime.pipeline.admission = full = Admission(limit=1, max_wait=None)
    assert full.enter() is None
    forged = slash_body(bot.slack, ALICE, "scale worker 6").replace("user_id=U0ALICE", "user_id=U0ALICE%27%3B+DROP+TABLE+x")
    status, body = await bot.post_signed(forged)
    assert status == 200 and "is not a Slack user id" in _text(body)
    status, body = await bot.slash(ALICE, "scael worker 6\x00\x1b[31m")
    assert status == 200 and _text(body).startswith(":x:") and "busy" not in body
    lookalike = slash_body(bot.slack, ALICE, "scale worker 6").replace("command=%2Fops", "command=%2F%D0%BEps")  # Cyrillic о
    status, body = await bot.post_signed(lookalike)
    assert "opsbot is busy" not in body
    status, body = await bot.slash(ALICE, "scale worker 7 --reason " + "x\x00" * 20_000)  # huge, with NULs
    assert status == 200 and "opsbot reads at most 2,000" in _text(body)
    # what does read is busy, from the fast path, and recorded as typed (look-alikes, mentions and all)
    seen = _count_dispatches(bot)
    odd = "scale worker 7 --reason 'ＩＮＣ-1 <!channel> раураl " + "y" * 1900 + "'"
    status, body = await bot.post_signed(slash_body(bot.slack, ALICE, odd))
    assert status == 200 and "opsbot is busy" in _text(body) and seen == []

    async def settled() -> list[dict[str, Any]] | None:
        rows = await bot.runtime.audit.log.rows()
        return rows if {"malformed", "invalid", "busy"} <= {r["event"] for r in rows} and len(rows) >= 4 else None

    rows = await bot.eventually(settled, what="the refusals' rows")
    await asyncio.sleep(0.3)
    rows = await bot.runtime.audit.log.rows()
    assert sorted(r["event"] for r in rows) == ["busy", "invalid", "invalid", "malformed"]
    assert next(r for r in rows if r["event"] == "busy")["command_text"] == odd
    assert all("\x00" not in (r["command_text"] or "") for r in rows)


async def test_an_unsigned_command_is_refused_while_full_too(bot: Harness) -> None:
    bot.runtime.pipeline.admission = full = Admission(limit=1, max_wait=None)
    assert full.enter() is None
    body = slash_body(bot.slack, ALICE, "scale worker 6")
    status, _ = await bot.post_signed(body, signature="v0=" + "0" * 64)
    assert status == 401
    status, _ = await bot.post_signed(body, timestamp=int(time.time()) - 3600)  # a replay of an old one
    assert status == 401
    await asyncio.sleep(0.3)
    assert await bot.runtime.audit.log.rows() == [] and _busy_count(bot) == 0


async def test_socket_mode_answers_busy_without_bolt_and_dispatches_the_rest(bot: Harness) -> None:
    """Socket Mode's handler (``Runtime.socket_mode_handler``) has the same fast path; with room, the
    envelope goes to Bolt as before. The Socket Mode connection is stood in for by what the handler
    sends back on it."""

    sent: list[tuple[str, dict[str, Any] | None]] = []

    class Connection:
        logger = logging.getLogger("test.socket_mode")

        async def send_socket_mode_response(self, response: Any) -> None:
            sent.append((response.envelope_id, response.payload))

    handler = bot.runtime.socket_mode_handler("xapp-test-token")
    try:
        await _socket_mode(bot, handler, Connection(), sent)
    finally:
        await handler.close_async()  # never connected; closes its HTTP session


async def _socket_mode(bot: Harness, handler: Any, connection: Any, sent: list[tuple[str, dict[str, Any] | None]]) -> None:
    from slack_sdk.socket_mode.request import SocketModeRequest

    seen = _count_dispatches(bot)
    bot.runtime.pipeline.admission = full = Admission(limit=1, max_wait=None)
    assert full.enter() is None
    payload = dict(urllib.parse.parse_qsl(slash_body(bot.slack, ALICE, "scale worker 6")))
    await handler.handle(connection, SocketModeRequest(type="slash_commands", envelope_id="e1", payload=payload))
    assert sent and sent[0][0] == "e1" and "opsbot is busy (1 command in flight)" in str((sent[0][1] or {}).get("text"))
    assert seen == []
    await bot.eventually(lambda: _rows_if(bot, 1), what="the busy row")
    full.leave()
    payload = dict(urllib.parse.parse_qsl(slash_body(bot.slack, ALICE, "scale worker 7")))
    await handler.handle(connection, SocketModeRequest(type="slash_commands", envelope_id="e2", payload=payload))
    assert seen == ["scale worker 7"] and sent[-1][0] == "e2"
    request = await bot.requested()
    assert request.text == "scale worker 7"
    assert [r["event"] for r in await bot.runtime.audit.log.rows() if r["event"] in ("busy", "requested")] == ["busy", "requested"]


# ---------------------------------------------------------------- OPSBOT_MAX_IN_FLIGHT

_ENV = {"SLACK_BOT_TOKEN": "xoxb-x", "SLACK_SIGNING_SECRET": "s", "DATABASE_URL": "postgresql://h/db", "REDIS_URL": "redis://h"}


def test_max_in_flight_comes_from_the_environment_into_admission(config: Config) -> None:
    assert Settings.from_env(_ENV).max_in_flight == 100
    settings = Settings.from_env({**_ENV, "OPSBOT_MAX_IN_FLIGHT": "7"})
    assert settings.max_in_flight == 7
    runtime = Runtime.build(settings, config)
    assert runtime.pipeline.admission.limit == 7 and runtime.pipeline.admission.bound() == 7


@pytest.mark.parametrize("given", ["0", "-5", "ten", "1.5", "", " ", "1001", "99999999999999999999", "١٠", "10\x00", "1e3"])
def test_a_max_in_flight_that_is_not_a_count_is_refused_saying_what_to_type(given: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({**_ENV, "OPSBOT_MAX_IN_FLIGHT": given})
    assert "OPSBOT_MAX_IN_FLIGHT is how many commands one process works on at once: a whole number from 1 to 1000" \
           in str(refused.value)


def test_opsbot_serve_refuses_to_start_with_a_bad_max_in_flight() -> None:
    env = {**os.environ, **_ENV, "OPSBOT_MAX_IN_FLIGHT": "0"}
    done = subprocess.run([sys.executable, "-m", "bot", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "OPSBOT_MAX_IN_FLIGHT is how many commands one process works on at once" in done.stderr + done.stdout


# ---------------------------------------------------------------- the pool's checkout test (bot/adapters/store.py)

async def test_a_pooled_connection_is_tested_only_after_it_sat_idle(state_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load a connection comes back and goes out again within milliseconds: testing it each
    time doubled the round trips. One that sat idle for a second is still tested, so a connection
    the database dropped meanwhile is replaced instead of failing the command."""
    from psycopg_pool import AsyncConnectionPool

    import bot.adapters.store as store_module

    tested: list[int] = []
    real = AsyncConnectionPool.check_connection

    async def counting(conn: Any) -> None:
        tested.append(1)
        await real(conn)

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(counting))
    monkeypatch.setattr(store_module, "RECHECK_AFTER", 0.5)
    store = Store(state_db, min_size=1, max_size=1)
    await store.open()
    try:
        async def backend_pid() -> int:
            async with store.connection() as conn:
                row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
            assert row is not None
            return int(row["pid"])

        first = await backend_pid()
        tested.clear()
        for _ in range(5):  # back and out again at once: not tested
            assert await backend_pid() == first
        assert tested == []
        async with await psycopg.AsyncConnection.connect(state_db, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (first,))  # the database drops it while idle
        await asyncio.sleep(0.7)
        second = await backend_pid()  # tested, found dead, replaced: no error for the command
        assert tested and second != first
    finally:
        await store.close()
