"""Approvals executed per second with 1 and 2 worker processes, before and after the one-statement
audit append (issue 13, item 3).

Reported: two workers executed 29–37 approvals/s, one worker 34/s: no gain, because every audit
append in every process queued behind one advisory lock held across five round trips. This runs,
in one go against one PostgreSQL, each combination of

* ``append``: ``before`` (the old append, copied below: BEGIN, lock, read the head, hash in Python,
  insert the row, insert the outbox entry, COMMIT) or ``after`` (``AuditLog.append``: one call of
  ``audit_append``, migration 008);
* ``workers``: 1 or 2 processes, each with the worker's concurrency (4 jobs at once, like
  bot/worker.py's BullMQ worker) and a pool of 10 connections,

over a fresh copy of the migrated database with ``--requests`` approved requests. Each job is what
``Executor.run`` does in the database for one approval, with the real Store and AuditLog calls:
claim (``transition`` approved → running), the ``started`` row, the target's session lock, the
action (``--action-ms`` of waiting, standing in for the Kubernetes PATCH against a fast API server:
the issue measured p50 30 ms approve → PATCH), ``transition`` running → succeeded, the ``succeeded``
row and the thread reply in ``chat_outbox``. BullMQ and Redis are left out on purpose: they are
not under the audit lock, and on 2 shared cores their CPU would hide what this measures.

    .venv/bin/python bench/approvals_throughput.py                  # 600 requests per run, 4 runs, ~1 min
    .venv/bin/python bench/approvals_throughput.py --requests 100   # smoke run
    .venv/bin/python bench/approvals_throughput.py --rounds 3       # each combination 3 times, interleaved; the median

Prints one JSON object per run, then a table (approvals/s and the 2-worker/1-worker ratio per
``append``). The machine is shared: compare the rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.adapters.audit_log import _AUDIT_LOCK, GENESIS, AuditLog, audit_hash, audit_record  # noqa: E402
from bot.adapters.store import Store  # noqa: E402
from bot.domain import Actor, RequestState, UserId  # noqa: E402
from bot.sandbox.servers import postgres_server  # noqa: E402

CONCURRENCY = 4  # bot/worker.py: the BullMQ worker's concurrency
SYSTEM = Actor(UserId("opsbot"), "opsbot")


class LegacyAuditLog(AuditLog):
    """The append before issue 13, verbatim: five round trips under the chain's lock."""

    async def append(self, *, event: str, actor_id: str, actor_name: str, channel_id: str, request_id: str | None,
                     command_text: str, plan: dict[str, Any] | None, result: dict[str, Any] | None, post: bool = True,
                     unless_spooled_id: str | None = None) -> dict[str, Any]:
        async with self.store.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK,))
            last = await (await conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")).fetchone()
            if last is None:
                cp = await (await conn.execute("SELECT upto_seq, last_hash FROM audit_checkpoints ORDER BY upto_seq DESC LIMIT 1"))\
                    .fetchone()
                seq, prev = ((cp["upto_seq"] + 1, cp["last_hash"]) if cp else (1, GENESIS))
            else:
                seq, prev = last["seq"] + 1, last["hash"]
            row = {"seq": seq, "at": datetime.now(UTC), "event": event, "actor_id": actor_id, "actor_name": actor_name,
                   "channel_id": channel_id, "request_id": request_id, "command_text": command_text, "plan": plan, "result": result}
            digest = audit_hash(prev, audit_record(row))
            await conn.execute(
                """INSERT INTO audit_events (seq, at, event, actor_id, actor_name, channel_id, request_id, command_text,
                       plan, result, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (seq, row["at"], event, actor_id, actor_name, channel_id, request_id, command_text,
                 Jsonb(plan) if plan is not None else None, Jsonb(result) if result is not None else None, prev, digest),
            )
            if post:
                await conn.execute("INSERT INTO audit_outbox (seq, request_id) VALUES (%s, %s)", (seq, request_id))
        return {**row, "prev_hash": prev, "hash": digest}


def plan_of(i: int) -> dict[str, Any]:
    return {"command": "scale", "target": f"deployment/nova/svc-{i}", "target_label": f"svc-{i}", "environment": "prod",
            "summary": f"svc-{i}: 3 → 4", "fingerprint": f"fp-{i}", "params": {"name": f"svc-{i}", "replicas": 4},
            "before": {"replicas": 3}, "after": {"replicas": 4}}


async def worker(url: str, mode: str, ids: list[str], action_ms: float) -> None:
    store = Store(url, max_size=10)
    await store.open()
    log = (LegacyAuditLog if mode == "before" else AuditLog)(store)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for request_id in ids:
        queue.put_nowait(request_id)
    async with store.connection():  # the pool is up: say ready, and wait for the start (imports are not measured)
        pass
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    async def execute(request_id: str) -> None:
        request = await store.transition(request_id, from_state=RequestState.APPROVED, to_state=RequestState.RUNNING,
                                         worker="bench")
        assert request is not None
        await log.append(event="started", actor_id="opsbot", actor_name="opsbot", channel_id=request.channel_id,
                         request_id=request.id, command_text=request.text, plan=request.plan, result=None)
        async with store.target_lock(str(request.plan["target"]), wait=60) as locked:
            assert locked
            await asyncio.sleep(action_ms / 1000)
            result = {"message": "scaled svc 3 → 4"}
            done = await store.transition(request.id, from_state=RequestState.RUNNING, to_state=RequestState.SUCCEEDED,
                                          result=result)
            assert done is not None
            await log.append(event="succeeded", actor_id="opsbot", actor_name="opsbot", channel_id=done.channel_id,
                             request_id=done.id, command_text=done.text, plan=done.plan, result=result)
        await store.add_thread_notice(done.id, ":large_green_circle: Done: scaled svc 3 → 4")

    async def loop() -> None:
        while not queue.empty():
            await execute(queue.get_nowait())

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    print("done", flush=True)
    await store.close()


async def prepare(url: str, n: int) -> list[str]:
    store = Store(url, max_size=4)
    await store.open()
    ids = [f"r-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    for i, request_id in enumerate(ids):
        await store.create_request(id=request_id, command="scale", text=f"scale svc-{i} 4", requester=Actor(UserId("U0ALICE"), "alice"),
                                   channel_id="C0INCIDENT", plan=plan_of(i), reason="bench", state=RequestState.APPROVED,
                                   approvals_required=1, approver_roles=("sre",), rule=None, expires_in=3600)
    await store.close()
    return ids


def fresh(admin: str, template: str) -> str:
    name = "bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return admin.rpartition("/")[0] + "/" + name


async def run(admin: str, template: str, *, mode: str, workers: int, requests: int, action_ms: float) -> dict[str, Any]:
    url = fresh(admin, template)
    ids = await prepare(url, requests)
    chunks = [ids[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, mode, str(action_ms), ",".join(chunk)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for chunk in chunks]
    for p in procs:
        assert p.stdout is not None and (await asyncio.to_thread(p.stdout.readline)).strip() == "ready"
    started = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdout is not None and (await asyncio.to_thread(p.stdout.readline)).strip() == "done"
    elapsed = time.perf_counter() - started
    codes = [await asyncio.to_thread(p.wait, 600) for p in procs]
    store = Store(url, max_size=1)
    await store.open()
    report = await AuditLog(store).verify()
    await store.close()
    assert codes == [0] * workers and report.ok and report.checked == 2 * requests, (codes, report.summary())
    return {"append": mode, "workers": workers, "requests": requests, "seconds": round(elapsed, 3),
            "approvals_per_s": round(requests / elapsed, 1), "chain": report.summary()}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--action-ms", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    with postgres_server(env_var=None) as admin:
        template = "bench_template"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {template}")
        store = Store(admin.rpartition("/")[0] + "/" + template, max_size=1)
        await store.open()
        await store.migrate()
        await store.close()
        results: list[dict[str, Any]] = []
        for _ in range(args.rounds):  # interleaved, so that the machine's mood hits every combination alike
            for mode in ("before", "after"):
                for workers in (1, 2):
                    r = await run(admin, template, mode=mode, workers=workers, requests=args.requests, action_ms=args.action_ms)
                    print(json.dumps(r), flush=True)
                    results.append(r)
    print(f"\napprovals executed per second ({args.requests} requests per run, action {args.action_ms:g} ms, "
          f"{CONCURRENCY} jobs at once per worker; median of {args.rounds})")
    print(f"{'append':<8} {'1 worker':>9} {'2 workers':>10} {'ratio':>6}")
    for mode in ("before", "after"):
        rate = {w: statistics.median(r["approvals_per_s"] for r in results if r["append"] == mode and r["workers"] == w)
                for w in (1, 2)}
        print(f"{mode:<8} {rate[1]:>9.1f} {rate[2]:>10.1f} {rate[2] / rate[1]:>5.2f}×")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, url_, mode_, action_, ids_ = sys.argv
        asyncio.run(worker(url_, mode_, ids_.split(","), float(action_)))
    else:
        asyncio.run(main())
