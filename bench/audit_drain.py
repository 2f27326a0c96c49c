"""How fast the audit channel catches up with a backlog, against a rate-limited fake Slack (issue 13,
item 2).

Reported: the poster drained ~20 rows/s, and each mutating command cost 7 Slack calls (3
chat.postMessage, 2 chat.getPermalink, 2 chat.update), so a burst of commands left the audit channel
minutes behind. This fills one PostgreSQL with a backlog of ``--requests`` requests of ``--rows``
audit rows each (their approval cards posted, so headlines link to them), then lets a poster drain
it for at most ``--seconds`` against the fake Slack with Slack's per-channel pace for
chat.postMessage (``--rate`` messages/s sustained, bursts of ``--burst``, 429 with Retry-After past
it) and chat.update (the same), through the real SlackChat and AsyncWebClient:

* ``before``: the poster as it was (one message per row, a getPermalink per headline and per
  card link, a headline update after each row), copied below;
* ``after``: ``bot.audit.AuditPoster``.

    .venv/bin/python bench/audit_drain.py                          # 200 requests × 5 rows, 30 s each, ~1.5 min
    .venv/bin/python bench/audit_drain.py --requests 20 --seconds 10   # smoke run
    .venv/bin/python bench/audit_drain.py --rate 0                 # no rate limit: the poster's own speed
    .venv/bin/python bench/audit_drain.py --sustain 50 --seconds 30 --code main=/work/main,this=.
                                                   # each tree's current poster, same load, one after the other
    .venv/bin/python bench/audit_drain.py --history 30000 --code main=/work/main,this=.
                                                   # the same with 30,000 earlier requests in the channel

Prints one JSON object per poster, then a table: rows and whole requests drained per second, Slack
calls per request by method, 429s received, and what a poster round's first query (which
headlines are behind) takes before the drain starts (median of 5; ``--history`` gives the trail a
past: 3,000 earlier requests made it 1.2 s before migration 013, 0.2 ms after). Both posters run
in the same invocation; compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from slack_sdk.web.async_client import AsyncWebClient

# --code runs this script once per tree, the tree's bot/ imported (OPSBOT_BENCH_ROOT), this script's measuring.
ROOT = Path(os.environ.get("OPSBOT_BENCH_ROOT") or Path(__file__).resolve().parent.parent).resolve()
sys.path.insert(0, str(ROOT))

import bot.audit as bot_audit  # noqa: E402
from bot.adapters.audit_log import AuditLog  # noqa: E402
from bot.adapters.store import Store  # noqa: E402
from bot.audit import Audit, AuditPoster  # noqa: E402
from bot.domain import Actor, OpsRequest, RequestState, UserId  # noqa: E402
from bot.errors import OpsbotError  # noqa: E402
from bot.messages import audit_headline, audit_line  # noqa: E402
from bot.notices import deliver  # noqa: E402
from bot.sandbox.servers import postgres_server  # noqa: E402
from bot.sandbox.slack_api import FakeSlack  # noqa: E402
from bot.slack.chat import SlackChat  # noqa: E402

CHANNEL, INCIDENT = "C0AUDIT", "C0INCIDENT"
EVENTS = ("requested", "approved", "started", "succeeded", "followed", "revert_scheduled", "reverted")


class LegacyAuditPoster(AuditPoster):
    """The poster before issue 13: one message per row, links asked for every time."""

    async def run_once(self) -> int:
        if not self.channel:
            return 0
        posted = 0
        async with await self.audit.log.poster_lock() as mine:
            if not mine:
                return 0
            for row in await self.audit.log.due_posts():
                if not row["due"]:
                    break
                try:
                    await self._post(self.channel, row)
                except OpsbotError as exc:
                    await self._failed([row], exc)
                    break
                posted += 1
            await self._headlines(self.channel)
        return posted

    async def _post(self, channel: str, row: dict[str, Any]) -> None:
        request_id = row["request_id"]
        request = await self.store.get(request_id)
        thread = await self.audit.log.thread(request_id)
        if thread is None:
            assert request is not None
            headline = audit_headline(request, row, await self._card_link(request))
            ts = await deliver(self.chat, channel=channel, text=headline, thread_ts=None, needle=f"`{request_id}`",
                               uncertain=row["uncertain"])
            await self.audit.log.save_thread(request_id, channel, ts, await self.chat.permalink(channel_id=channel, ts=ts))
            thread = await self.audit.log.thread(request_id)
            assert thread is not None
            await self.store.touch_card(request_id)
        ts = await deliver(self.chat, channel=channel, text=audit_line(row), thread_ts=thread["ts"], needle=row["hash"],
                           uncertain=row["uncertain"])
        await self.audit.log.mark_posted(row["seq"], ts)

    async def _card_link(self, request: OpsRequest | None) -> str | None:
        if request and request.card_channel and request.card_ts:
            return await self.chat.permalink(channel_id=request.card_channel, ts=request.card_ts)
        return None


async def fill(url: str, requests: int, rows: int) -> None:
    store = Store(url, max_size=4)
    await store.open()
    log = AuditLog(store)
    ids = [f"r-{uuid.uuid4().hex[:8]}" for _ in range(requests)]
    for i, request_id in enumerate(ids):
        plan = {"command": "scale", "target": f"deployment/nova/svc-{i}", "target_label": f"svc-{i}", "environment": "production",
                "summary": f"svc-{i}: 3 → 4 replicas", "fingerprint": f"fp-{i}", "params": {}}
        await store.create_request(id=request_id, command="scale", text=f"scale svc-{i} 4", requester=Actor(UserId("U0ALICE"), "alice"),
                                   channel_id=INCIDENT, plan=plan, reason="incident", state=RequestState.SUCCEEDED,
                                   approvals_required=1, approver_roles=("sre",), rule=None, expires_in=3600)
        await store.set_card(request_id, INCIDENT, f"{1600000000 + i}.000100")
    for step in range(rows):  # interleaved, as a burst of commands writes them
        for i, request_id in enumerate(ids):
            await log.append(event=EVENTS[step % len(EVENTS)], actor_id="U0CAROL" if step == 1 else "opsbot", actor_name="",
                             channel_id=INCIDENT, request_id=request_id, command_text=f"scale svc-{i} 4",
                             plan={"summary": f"svc-{i}: 3 → 4 replicas", "environment": "production"},
                             result={"message": "scaled"} if step >= 3 else None)
    await store.close()


def history(url: str, threads: int, rows: int = 5) -> None:
    """``threads`` earlier requests already in the channel, their headlines up to date: the trail of
    earlier days, as a poster round sees it (audit_threads and audit_outbox; seqs far above any new
    row's). A tree with migration 013 gets posted_seq as that migration fills it in."""
    if not threads:
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO audit_outbox (seq, request_id, posted_ts)
                        SELECT 1000000000000 + g, 'h-' || (g / %s), 'old.' || g FROM generate_series(0, %s - 1) g""",
                     (rows, threads * rows))
        conn.execute("""INSERT INTO audit_threads (request_id, channel, ts, headline_seq)
                        SELECT 'h-' || t, %s, 'old-head.' || t, 1000000000000 + (t + 1) * %s - 1 FROM generate_series(0, %s - 1) t""",
                     (CHANNEL, rows, threads))
        if conn.execute("SELECT 1 FROM information_schema.columns WHERE table_name = 'audit_threads' "
                        "AND column_name = 'posted_seq'").fetchone():
            conn.execute("UPDATE audit_threads SET posted_seq = headline_seq WHERE request_id LIKE 'h-%'")
        conn.execute("VACUUM ANALYZE audit_outbox")
        conn.execute("VACUUM ANALYZE audit_threads")


async def drain(url: str, kind: str, *, seconds: float, rate: float, burst: int) -> dict[str, Any]:
    slack = await FakeSlack().start()
    if rate > 0:
        slack.channel_rate = {"chat.postMessage": (rate, burst), "chat.update": (rate, burst)}
    store = Store(url, max_size=4)
    await store.open()
    log = AuditLog(store)
    total = await log.unposted()
    round_ms = []  # what each poster round asks first: which headlines are behind (with --history, a trail with a past)
    for _ in range(5):
        t0 = time.perf_counter()
        await log.stale_headlines()
        round_ms.append(1000 * (time.perf_counter() - t0))
    chat = SlackChat(AsyncWebClient(token="xoxb-test-token", base_url=slack.api_url))
    audit = Audit(log, audit_channel=CHANNEL)
    poster = (LegacyAuditPoster if kind == "before" else AuditPoster)(audit=audit, store=store, chat=chat)
    started = time.perf_counter()
    poster.start()
    while time.perf_counter() - started < seconds and await log.unposted():
        await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - started
    assert poster._task is not None
    poster._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poster._task
    left = await log.unposted()
    async with store.connection() as conn:
        done = await (await conn.execute(
            """SELECT count(DISTINCT request_id) AS n FROM audit_outbox o WHERE o.request_id NOT LIKE 'h-%%' AND NOT EXISTS
                   (SELECT 1 FROM audit_outbox u WHERE u.request_id = o.request_id AND u.posted_ts IS NULL)""")).fetchone()
    await store.close()
    await slack.stop()
    calls = Counter(m for m, _ in slack.calls)
    drained_requests = int(done["n"]) if done else 0
    per = max(1, drained_requests)
    return {"poster": kind, "backlog_rows": total, "seconds": round(elapsed, 2), "rows_posted": total - left,
            "rows_per_s": round((total - left) / elapsed, 1), "requests_drained": drained_requests,
            "requests_per_s": round(drained_requests / elapsed, 2), "http_429": slack.throttled,
            "stale_headlines_ms": round(sorted(round_ms)[2], 2),
            "calls_per_request": {m: round(n / per, 2) for m, n in sorted(calls.items())}}


# What the poster's message sizes were before the sustained-load change (issue 13, item 7), to
# compare with in the same run (``--sustain``): the module's constants are read at each call.
SIZES = {"previous": {"LINES_PER_MESSAGE": 120, "CHARS_PER_MESSAGE": 30_000, "HEADLINES_PER_MESSAGE": 25},
         "now": {k: getattr(bot_audit, k) for k in ("LINES_PER_MESSAGE", "CHARS_PER_MESSAGE", "HEADLINES_PER_MESSAGE")}}


async def sustain(url: str, kind: str, *, commands_per_s: float, rows: int, seconds: float, catch_up: float, rate: float,
                  burst: int) -> dict[str, Any]:
    """Requests keep coming (``commands_per_s``, ``rows`` audit rows each, written as they are
    created) for ``seconds`` while the poster drains at Slack's pace; then the writers stop and the
    poster has ``catch_up`` s to empty the backlog. Reports the backlog (rows not yet in the
    channel) over time and how far behind the channel was (age of the oldest unposted row)."""
    for name, value in SIZES[kind].items():
        setattr(bot_audit, name, value)
    slack = await FakeSlack().start()
    if rate > 0:
        slack.channel_rate = {"chat.postMessage": (rate, burst), "chat.update": (rate, burst)}
    store = Store(url, max_size=8)
    await store.open()
    log = AuditLog(store)
    chat = SlackChat(AsyncWebClient(token="xoxb-test-token", base_url=slack.api_url))
    audit = Audit(log, audit_channel=CHANNEL)
    # the poster on a pool of its own: the writers below (50 at once) would otherwise hold every
    # connection of a shared one waiting for the chain's lock, and what is measured is the poster
    poster_store = Store(url, max_size=2)
    await poster_store.open()
    poster = AuditPoster(audit=Audit(AuditLog(poster_store), audit_channel=CHANNEL), store=poster_store, chat=chat)
    audit.appended = poster.audit.appended  # each new row wakes the poster, as in one process
    written = 0

    async def one(i: int) -> None:
        nonlocal written
        request_id = f"r-{uuid.uuid4().hex[:8]}"
        plan = {"command": "scale", "target": f"deployment/nova/svc-{i}", "target_label": f"svc-{i}", "environment": "production",
                "summary": f"svc-{i}: 3 → 4 replicas", "fingerprint": f"fp-{i}", "params": {}}
        await store.create_request(id=request_id, command="scale", text=f"scale svc-{i} 4", requester=Actor(UserId("U0ALICE"), "alice"),
                                   channel_id=INCIDENT, plan=plan, reason="incident", state=RequestState.SUCCEEDED,
                                   approvals_required=1, approver_roles=("sre",), rule=None, expires_in=3600)
        await store.set_card(request_id, INCIDENT, f"{1600000000 + i}.000100")
        for step in range(rows):
            await audit.record(EVENTS[step % len(EVENTS)], actor=Actor(UserId("U0CAROL" if step == 1 else "opsbot"), ""),
                               channel_id=INCIDENT, request_id=request_id, text=f"scale svc-{i} 4",
                               plan={"summary": f"svc-{i}: 3 → 4 replicas", "environment": "production"},
                               result={"message": "scaled"} if step >= 3 else None)
            written += 1

    async def lag() -> float:
        async with store.connection() as conn:
            row = await (await conn.execute(
                """SELECT extract(epoch FROM now() - min(e.at)) AS behind FROM audit_outbox o JOIN audit_events e USING (seq)
                   WHERE o.posted_ts IS NULL""")).fetchone()
        return float(row["behind"] or 0.0) if row else 0.0

    poster.start()
    samples: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    i = 0
    next_sample = 1.0
    while (now := time.perf_counter() - started) < seconds:
        while i < int(now * commands_per_s):
            tasks.append(asyncio.ensure_future(one(i)))
            i += 1
        if now >= next_sample:
            samples.append({"t": round(now, 1), "written": written, "backlog": await log.unposted(), "behind_s": round(await lag(), 1)})
            next_sample += 1.0
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    stopped = time.perf_counter()
    while await log.unposted() and time.perf_counter() - stopped < catch_up:
        await asyncio.sleep(0.2)
    caught_up_in = time.perf_counter() - stopped
    left = await log.unposted()
    assert poster._task is not None
    poster._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poster._task
    report = await log.verify()
    await poster_store.close()
    await store.close()
    await slack.stop()
    calls = Counter(m for m, _ in slack.calls)
    per_message = [sum(1 for line in str(a.get("text", "")).splitlines() if line.startswith("`#"))
                   for a in slack.calls_to("chat.postMessage") if a.get("thread_ts")]
    # What went out (not the calls answered 429): rows per thread reply, characters per row posted.
    sent = [m for m in slack.messages if m.channel == CHANNEL]
    replies = [m for m in sent if m.thread_ts]
    rows_posted = written - left
    return {"sizes": kind, "rows_posted": rows_posted, "replies": len(replies),
            "rows_per_reply_mean": round(rows_posted / max(1, len(replies)), 1),
            "chars_per_row": round(sum(len(m.text) for m in sent) / max(1, rows_posted), 1),
            "headline_chars": sum(len(m.text) for m in sent if not m.thread_ts),
            "lines_per_reply_mean": round(sum(per_message) / max(1, len(per_message)), 1),
            "lines_per_reply_max": max(per_message, default=0), **SIZES[kind], "commands_per_s": commands_per_s,
            "rows_per_command": rows, "seconds": seconds,
            "rows_written": written, "backlog_at_stop": samples[-1]["backlog"] if samples else None,
            "max_backlog": max((s["backlog"] for s in samples), default=0),
            "max_behind_s": max((s["behind_s"] for s in samples), default=0.0),
            "caught_up_s": round(caught_up_in, 1) if not left else None, "left_after_catch_up": left,
            "messages": calls.get("chat.postMessage", 0), "http_429": slack.throttled, "chain": report.summary(),
            "calls": dict(sorted(calls.items())),
            "samples": samples}


def fresh(admin: str, template: str) -> str:
    name = "drain_" + uuid.uuid4().hex[:10]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return admin.rpartition("/")[0] + "/" + name


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=1.0, help="chat.postMessage/chat.update per second per channel; 0: no limit")
    ap.add_argument("--burst", type=int, default=3)
    ap.add_argument("--sustain", type=float, default=0.0,
                    help="commands/s arriving during the run (each with --rows rows) instead of a backlog; compares the "
                         "previous message sizes with the current ones")
    ap.add_argument("--catch-up", type=float, default=60.0, help="with --sustain: seconds allowed to empty the backlog after")
    ap.add_argument("--code", default="",
                    help="name=tree,… (e.g. main=/work/main,this=.): run the current poster of each tree in turn, same "
                         "sizes and load, and compare them instead of the built-in before/after")
    ap.add_argument("--history", type=int, default=0,
                    help="requests already in the channel before the run (5 rows each, headlines up to date): a trail "
                         "with a past, which each poster round used to read whole")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)  # one poster kind only (what --code runs per tree)
    args = ap.parse_args()
    if args.code:
        compare_trees(args)
        return
    if args.sustain > 0:
        await main_sustained(args)
        return
    with postgres_server(env_var=None) as admin:
        template = "drain_template"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {template}")
        url = admin.rpartition("/")[0] + "/" + template
        store = Store(url, max_size=1)
        await store.open()
        await store.migrate()
        await store.close()
        history(url, args.history)
        await fill(url, args.requests, args.rows)
        results = []
        for kind in [args.only] if args.only else ["before", "after"]:
            r = await drain(fresh(admin, template), kind, seconds=args.seconds, rate=args.rate, burst=args.burst)
            print(json.dumps(r), flush=True)
            results.append(r)
    limit = f"{args.rate:g} msg/s per channel, bursts of {args.burst}" if args.rate > 0 else "no rate limit"
    print(f"\naudit channel drain: backlog of {args.requests} requests × {args.rows} rows, fake Slack at {limit}, "
          f"at most {args.seconds:g} s each")
    print(f"{'poster':<8} {'rows/s':>7} {'req/s':>6} {'drained':>8} {'429s':>5} {'round ms':>8}  Slack calls per drained request")
    for r in results:
        calls = ", ".join(f"{m.removeprefix('chat.')} {n}" for m, n in r["calls_per_request"].items())
        print(f"{r['poster']:<8} {r['rows_per_s']:>7.1f} {r['requests_per_s']:>6.2f} {r['requests_drained']:>8} "
              f"{r['http_429']:>5} {r.get('stale_headlines_ms', '-')!s:>8}  {calls}")


async def main_sustained(args: argparse.Namespace) -> None:
    with postgres_server(env_var=None) as admin:
        template = "drain_template"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {template}")
        store = Store(admin.rpartition("/")[0] + "/" + template, max_size=1)
        await store.open()
        await store.migrate()
        await store.close()
        history(admin.rpartition("/")[0] + "/" + template, args.history)
        results = []
        for kind in [args.only] if args.only else ["previous", "now"]:
            r = await sustain(fresh(admin, template), kind, commands_per_s=args.sustain, rows=args.rows, seconds=args.seconds,
                              catch_up=args.catch_up, rate=args.rate, burst=args.burst)
            print(json.dumps(r), flush=True)
            results.append(r)
    limit = f"{args.rate:g} msg/s per channel, bursts of {args.burst}" if args.rate > 0 else "no rate limit"
    print(f"\naudit channel under sustained load: {args.sustain:g} commands/s × {args.rows} rows for {args.seconds:g} s, "
          f"fake Slack at {limit}")
    print(f"{'sizes':<9} {'lines':>5} {'chars':>6} {'heads':>5} {'written':>8} {'backlog@stop':>12} {'max behind s':>12} "
          f"{'caught up s':>11} {'msgs':>5} {'429s':>5} {'lines/reply':>11}")
    for r in results:
        caught = "-" if r["caught_up_s"] is None else f"{r['caught_up_s']:.1f}"
        print(f"{r['sizes']:<9} {r['LINES_PER_MESSAGE']:>5} {r['CHARS_PER_MESSAGE']:>6} {r['HEADLINES_PER_MESSAGE']:>5} "
              f"{r['rows_written']:>8} {r['backlog_at_stop']!s:>12} {r['max_behind_s']:>12.1f} {caught:>11} {r['messages']:>5} "
              f"{r['http_429']:>5} {r['lines_per_reply_mean']:>11}")


def compare_trees(args: argparse.Namespace) -> None:
    """Each tree's current poster (``now`` / ``after``) under the same load, one tree after the other."""
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--code") if "--code" in argv else -1
    argv = argv[:i] + argv[i + 2:] if i >= 0 else [a for a in argv if not a.startswith("--code=")]
    kind = "now" if args.sustain > 0 else "after"
    results = []
    for item in args.code.split(","):
        name, _, tree = item.partition("=")
        proc = subprocess.run([sys.executable, __file__, *argv, "--only", kind], capture_output=True, text=True,
                              env={**os.environ, "OPSBOT_BENCH_ROOT": str(Path(tree).resolve())}, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name} ({tree}) failed:\n{proc.stderr[-3000:]}")
        r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
        r["code"] = name
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.sustain > 0:
        print(f"\naudit channel under sustained load: {args.sustain:g} commands/s × {args.rows} rows for {args.seconds:g} s, "
              f"fake Slack at {args.rate:g} msg/s per channel, bursts of {args.burst}; catch-up allowed {args.catch_up:g} s")
        print(f"{'code':<8} {'written':>8} {'backlog@stop':>12} {'max behind s':>12} {'caught up s':>11} {'left':>6} "
              f"{'msgs':>5} {'429s':>5} {'rows/reply':>10} {'chars/row':>9}")
        for r in results:
            caught = "-" if r["caught_up_s"] is None else f"{r['caught_up_s']:.1f}"
            print(f"{r['code']:<8} {r['rows_written']:>8} {r['backlog_at_stop']!s:>12} {r['max_behind_s']:>12.1f} {caught:>11} "
                  f"{r['left_after_catch_up']:>6} {r['messages']:>5} {r['http_429']:>5} {r.get('rows_per_reply_mean', '-')!s:>10} "
                  f"{r.get('chars_per_row', '-')!s:>9}")
    else:
        print(f"\naudit channel drain: backlog of {args.requests} requests × {args.rows} rows, fake Slack at {args.rate:g} msg/s "
              f"per channel, bursts of {args.burst}, at most {args.seconds:g} s each")
        print(f"{'code':<8} {'rows/s':>7} {'req/s':>6} {'drained':>8} {'429s':>5} {'round ms':>8}  Slack calls per drained request")
        for r in results:
            calls = ", ".join(f"{m.removeprefix('chat.')} {n}" for m, n in r["calls_per_request"].items())
            print(f"{r['code']:<8} {r['rows_per_s']:>7.1f} {r['requests_per_s']:>6.2f} {r['requests_drained']:>8} "
                  f"{r['http_429']:>5} {r.get('stale_headlines_ms', '-')!s:>8}  {calls}")


if __name__ == "__main__":
    asyncio.run(main())
