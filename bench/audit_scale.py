"""The audit trail's read paths at scale (issue 13, items 4 and 5).

Builds a chain of ``--rows`` audit rows (default 1,000,000) straight into a private PostgreSQL
(COPY, hashes computed as ``AuditLog.append`` does: requests of 4–5 steps sharing a plan, as the
bot writes them), migrated by the opsbot checkout under test, then times, with that checkout's CLI
as a subprocess (its peak RSS: VmHWM):

* ``opsbot audit verify``, ``audit export`` (jsonl, csv), ``audit verify --file`` of the export;
* every ``/ops audit`` filter (``AuditLog.search`` in a subprocess of the checkout: median of 5).

    .venv/bin/python bench/audit_scale.py                        # 1M rows, this checkout
    .venv/bin/python bench/audit_scale.py --rows 20000           # quick run
    .venv/bin/python bench/audit_scale.py --checkout /work/main  # the same against another checkout (before)
    .venv/bin/python bench/audit_scale.py --tree /work/main      # this checkout and another, interleaved on one table

With ``--tree``, each CLI command runs for this checkout, then the other, on the same rows (built
and migrated by this checkout), and their exports are compared byte for byte and, for jsonl (whose
form changed in issue 13: both hashes first, then the record as hashed), line by line as JSON.

Prints one JSON object, then a table.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bot.domain import canonical_json
from bot.sandbox.servers import postgres_server

EVENTS = ("requested", "approval_given", "approved", "succeeded")
SEARCH = """
import asyncio, json, statistics, sys, time
from datetime import UTC, datetime, timedelta
from bot.adapters.store import Store
from bot.adapters.audit_log import AuditLog
FILTERS = {"--user U7": {"user": "U7"}, "--user @user7 --since 7d": {"user": "@user7", "since": "7d"},
           "--command restart": {"command": "restart"}, "--target w42": {"target": "w42"}, "--since 1h": {"since": "1h"},
           "--outcome failed": {"outcome": "failed"}, "--outcome failed --page 5": {"outcome": "failed", "page": 5},
           "--command scale --outcome failed": {"command": "scale", "outcome": "failed"}}
async def main():
    store = Store(sys.argv[1], max_size=1); await store.open(); log = AuditLog(store); out = {}
    for name, f in FILTERS.items():
        f = dict(f); page = f.pop("page", 1)
        if "since" in f:
            f["since"] = datetime.now(UTC) - (timedelta(days=7) if f["since"] == "7d" else timedelta(hours=1))
        times = []
        for _ in range(5):
            t0 = time.perf_counter(); rows, total = await log.search(**f, limit=15, offset=(page - 1) * 15)
            times.append(time.perf_counter() - t0)
        out[name] = {"ms": round(statistics.median(times) * 1000, 1), "rows": len(rows), "total": total}
    await store.close(); print(json.dumps(out))
asyncio.run(main())
"""


def build(url: str, rows: int, *, canon: bool = True) -> None:
    """``rows`` chained rows, written with COPY in chunks (hashes, and ``canon`` where the checkout has
    it, as AuditLog.append computes them). ``canon=False``: rows as written before migration 009."""
    start = datetime.now(UTC) - timedelta(seconds=rows)
    prev = "0" * 64
    with psycopg.connect(url, autocommit=True) as conn:
        # migration 009: new rows keep the exact text their hash covers (a checkout without it: no column)
        with_canon = canon and conn.execute("SELECT 1 FROM information_schema.columns WHERE table_name = 'audit_events' "
                                            "AND column_name = 'canon'").fetchone() is not None
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
        seq = 0
        while seq < rows:
            buf = io.StringIO()
            for _ in range(min(50_000, rows - seq)):
                seq += 1
                req = seq // 4
                cmd = ("scale", "restart", "status")[req % 3]
                plan = {"command": cmd, "target": f"deployment/prod/payments/w{req % 97}", "target_label": f"payments/w{req % 97}",
                        "environment": "prod", "params": {"replicas": req % 10, "name": f"w{req % 97}"},
                        "summary": f"w{req % 97}: 3 → {req % 10} replicas", "details": ["current: 3 replicas", "ready: 3"],
                        "before": {"replicas": 3}, "after": {"replicas": req % 10}, "observed": None, "mutating": True,
                        "target_name": f"w{req % 97}", "target_kind": "deployment", "facts": {}, "fingerprint": f"{req:016x}"}
                event = "failed" if seq % 4 == 3 and req % 10 == 0 else EVENTS[seq % 4]
                result = {"approvers": [f"U{(req + 1) % 500}"]} if event == "approved" else \
                    ({"message": "scaled", "replicas": req % 10} if event == "succeeded" else None)
                row = {"seq": seq, "at": (start + timedelta(seconds=seq)).isoformat(timespec="microseconds"), "event": event,
                       "actor_id": f"U{req % 500}", "actor_name": f"user{req % 500}", "channel_id": "C0OPS", "request_id": f"r-{req}",
                       "command_text": f"{cmd} w{req % 97} {req % 10}", "plan": plan, "result": result}
                text = canonical_json(row)
                digest = hashlib.sha256((prev + text).encode()).hexdigest()
                fields = [str(seq), row["at"], event, row["actor_id"], row["actor_name"], "C0OPS", row["request_id"], row["command_text"],
                          json.dumps(plan, ensure_ascii=False), json.dumps(result) if result is not None else "\\N", prev, digest,
                          *([text] if with_canon else [])]
                buf.write("\t".join(f.replace("\\", "\\\\") if f != "\\N" else f for f in fields) + "\n")
                prev = digest
            with conn.cursor().copy("COPY audit_events (seq, at, event, actor_id, actor_name, channel_id, request_id, command_text, "
                                    "plan, result, prev_hash, hash" + (", canon" if with_canon else "") + ") FROM STDIN") as copy:
                copy.write(buf.getvalue())
        conn.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")
        conn.execute("VACUUM ANALYZE audit_events")


def same_lines(a: str, b: str) -> bool:
    """Whether two jsonl exports hold the same rows (each line parsed), streamed."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for la, lb in zip(fa, fb, strict=False):
            if json.loads(la) != json.loads(lb):
                return False
        return fa.read(1) == fb.read(1) == b""


def run_measured(checkout: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One CLI run of the checkout: seconds, peak RSS (MiB) and the end of its output. The peak is
    the child's VmHWM, polled from /proc: its rusage would carry this (big) process's RSS, which a
    vfork'd child inherits as its high-water mark."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "bot", *args], cwd=checkout, env=env, stdout=out, stderr=err)
        peak_kib = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    peak_kib = max([peak_kib, *(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))])
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        tail = (out.read().decode()[-160:] + " " + err.read().decode()[-160:]).strip()
    return {"s": round(seconds, 2), "rss_mib": round(peak_kib / 1024, 1), "rc": proc.returncode, "out": tail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--without-canon", action="store_true",
                    help="write the rows as before migration 009 (no canon column value): verify's slower path")
    ap.add_argument("--tree", action="append", default=[],
                    help="another opsbot checkout (e.g. /work/main) whose CLI runs too, after this one's, on the same rows")
    ap.add_argument("--checkout", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the opsbot checkout whose CLI and migrations are measured (default this one)")
    a = ap.parse_args()
    checkout = os.path.abspath(a.checkout)
    with postgres_server(env_var=None) as admin, tempfile.TemporaryDirectory(prefix="opsbot-audit-bench-") as tmp:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE audit_bench")
        url = admin.rsplit("/", 1)[0] + "/audit_bench"
        env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": checkout}
        subprocess.run([sys.executable, "-m", "bot", "migrate"], cwd=checkout, env=env, check=True, capture_output=True)
        t0 = time.perf_counter()
        build(url, a.rows, canon=not a.without_canon)
        built = time.perf_counter() - t0
        trees = {"this": checkout, **{f"tree{i + 1}": os.path.abspath(t) for i, t in enumerate(a.tree)}}
        cli: dict[str, dict[str, Any]] = {}
        for cmd in ("verify", "export jsonl", "export csv", "verify --file"):
            for name, tree in trees.items():
                jsonl, csvf = os.path.join(tmp, f"{name}.jsonl"), os.path.join(tmp, f"{name}.csv")
                argv = {"verify": ["audit", "verify"], "export jsonl": ["audit", "export", "-o", jsonl],
                        "export csv": ["audit", "export", "--format", "csv", "-o", csvf],
                        "verify --file": ["audit", "verify", "--file", jsonl]}[cmd]
                key = cmd if len(trees) == 1 else f"{cmd} [{name}]"
                cli[key] = run_measured(tree, argv, {**env, "PYTHONPATH": tree})
                cli[key]["rows_per_s"] = round(a.rows / cli[key]["s"]) if cli[key]["s"] else None
        same = {ext: all(filecmp.cmp(os.path.join(tmp, f"this.{ext}"), os.path.join(tmp, f"{n}.{ext}"), shallow=False)
                         for n in trees if n != "this") for ext in ("jsonl", "csv")} if len(trees) > 1 else {}
        # the jsonl exports of two checkouts may differ in form (key order, spaces) but not in content
        same_content = {n: same_lines(os.path.join(tmp, "this.jsonl"), os.path.join(tmp, f"{n}.jsonl")) for n in trees if n != "this"}
        search = subprocess.run([sys.executable, "-c", SEARCH, url], cwd=checkout, env=env, capture_output=True, text=True)
        result = {"rows": a.rows, "checkout": checkout, "trees": trees, "same_export_bytes": same, "same_export_content": same_content,
                  "build_s": round(built, 1), "cli": cli,
                  "search": json.loads(search.stdout) if search.returncode == 0 else {"error": search.stderr[-500:]}}
    print(json.dumps(result, indent=1))
    print(f"\n{a.rows:,} rows, " + ", ".join(f"{n} = {t}" for n, t in result["trees"].items())
          + (f"; exports identical: {result['same_export_bytes']}, same content (jsonl): {same_content}"
             if result["same_export_bytes"] else ""))
    print(f"{'command':<44}{'seconds':>9}{'rows/s':>11}{'peak RSS MiB':>14}  rc")
    for name, r in cli.items():
        print(f"{'opsbot audit ' + name:<44}{r['s']:>9}{r['rows_per_s'] or 0:>11,}{r['rss_mib']:>14}  {r['rc']}")
    for name, r in result["search"].items():
        if isinstance(r, dict):
            print(f"{'/ops audit ' + name:<36}{r['ms']:>8}ms  ({r['rows']} rows, total {r['total']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
