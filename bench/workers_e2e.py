"""Approvals executed per second with 1 and 2 `opsbot worker` processes, end to end (issue 13).

bench/approvals_throughput.py measures the database part of an execution alone (the PATCH is a
wait, BullMQ is left out). This one runs the real thing: `opsbot serve --no-worker` takes
``--requests`` signed `/ops scale svc-i N` commands (one deployment each, so no two jobs share a
target lock) and an approver's click on each card, which queues each job on BullMQ (Redis); then
1 or 2 `opsbot worker` processes (BullMQ workers, 4 jobs at once each, as in production) are
started and execute them against the Kubernetes emulator: claim, audit rows, the scale PATCH, the
result in the card's thread, the rollout followed. Throughput is counted from the first `started`
audit row to the last `succeeded` one (the workers' start-up is not in it), per run, interleaved
over ``--rounds``.

    .venv/bin/python bench/workers_e2e.py                     # 200 requests, 2 rounds
    .venv/bin/python bench/workers_e2e.py --requests 40 --rounds 1   # quick
    .venv/bin/python bench/workers_e2e.py --code main=/work/main,this=. --kube-latency 0,5-30 --requests 80 --rounds 1

``--kube-latency 0,5-30`` runs each combination twice: with the emulator as fast as it goes (on 2
shared cores: CPU-bound, the machine is the limit) and with every API call waiting 5–30 ms, as a
real API server takes, which costs no CPU: scaling there shows whether opsbot itself serialises.
Each run also reports the whole machine's CPU use (``machine_busy_pct``; other work on the machine
as ``others_cpu_s``), CPU ms per execution of each process (worker, serve, PostgreSQL, Redis, this
process: the emulator and the fake Slack), what opsbot's PostgreSQL sessions waited on
(``pg``: pg_stat_activity sampled every 20 ms, lock waits from pg_locks), the workers' pool waits
(``db_pool``, from their /metrics) and how many jobs each worker really had in flight.

Prints one JSON object per run, then a table with the 2-worker/1-worker ratio (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import psycopg
from psycopg.rows import dict_row
from slack_sdk.signature import SignatureVerifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ack_latency import wait_ready  # noqa: E402
from bench.cpu_use import CpuUse, find_pid  # noqa: E402
from bench.incident_load import create_database  # noqa: E402
from bot.sandbox.kube_apiserver import KubeApiServer, deployment_manifest  # noqa: E402
from bot.sandbox.servers import free_port, postgres_server, redis_server  # noqa: E402
from bot.sandbox.slack_api import FakeSlack  # noqa: E402

SECRET = "bench-secret"
CHANNEL = "C0INCIDENT"
REQUESTER, APPROVER = "U0ALICE", "U0CAROL"


def policy(n: int) -> str:
    deployments = "\n".join(f"  svc-{i}: {{environment: production, namespace: nova, name: svc-{i}, replicas: {{min: 1, max: 20}}}}"
                            for i in range(n))
    return f"""
slack: {{audit_channel: C0AUDIT, allowed_channels: [{CHANNEL}]}}
roles:
  engineer: {{users: [{REQUESTER}]}}
  approver: {{users: [{APPROVER}]}}
environments:
  production: {{kube_context: nova-prod}}
deployments:
{deployments}
limits: {{max_open_requests_per_user: {n + 10}}}
rules:
  - name: production-changes
    commands: [scale]
    allow: [engineer]
    approval: {{from: [approver], count: 1, expires: 60m}}
"""


def _headers(verifier: SignatureVerifier, body: str) -> dict[str, str]:
    ts = str(int(time.time()))
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": verifier.generate_signature(timestamp=ts, body=body) or "",
            "Content-Type": "application/x-www-form-urlencoded"}


def slash(slack: FakeSlack, text: str) -> str:
    key = uuid.uuid4().hex
    return urlencode({"team_id": "T0FAKE", "channel_id": CHANNEL, "channel_name": "incident", "user_id": REQUESTER,
                      "user_name": "alice", "command": "/ops", "text": text, "api_app_id": "A0OPS",
                      "response_url": slack.response_url(key), "trigger_id": key})


def approve(slack: FakeSlack, request_id: str, card_ts: str) -> str:
    payload = {"type": "block_actions", "team": {"id": "T0FAKE"}, "user": {"id": APPROVER, "username": "carol", "name": "carol"},
               "api_app_id": "A0OPS", "container": {"type": "message", "message_ts": card_ts, "channel_id": CHANNEL},
               "trigger_id": uuid.uuid4().hex, "channel": {"id": CHANNEL, "name": "incident"},
               "message": {"ts": card_ts, "text": "card"}, "response_url": slack.response_url("click-" + uuid.uuid4().hex),
               "actions": [{"action_id": "opsbot_approve", "block_id": f"opsbot_vote:{request_id}", "value": request_id,
                            "type": "button", "action_ts": str(time.time())}]}
    return urlencode({"payload": json.dumps(payload)})


async def pg_waits(db_url: str, stop: asyncio.Event, every: float = 0.02) -> dict[str, Any]:
    """Samples pg_stat_activity of the run's database every ``every`` s while the workers run: what
    opsbot's connections were doing (active on CPU, waiting on a lock, idle in a transaction while
    Python works), and how often a lock was waited for (pg_locks not granted)."""
    seen: dict[str, int] = {}
    samples = lock_waits = 0
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        while not stop.is_set():
            rows = await (await conn.execute(
                """SELECT state, coalesce(wait_event_type || ':' || wait_event, 'cpu') FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
                      AND state <> 'idle'""")).fetchall()
            waiting = await (await conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted "
                "AND a.datname = current_database()")).fetchone()
            samples += 1
            lock_waits += int(waiting[0]) if waiting else 0
            for state, wait in rows:
                key = f"{state} {wait}" if state == "active" else str(state)
                seen[key] = seen.get(key, 0) + 1
            await asyncio.sleep(every)
    return {"samples": samples, "lock_waits_per_sample": round(lock_waits / samples, 3) if samples else None,
            "busy_per_sample": {k: round(v / samples, 2) for k, v in sorted(seen.items(), key=lambda kv: -kv[1])} if samples else {}}


async def pool_stats(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The worker's PostgreSQL pool counters from its /metrics (opsbot_db_pool_*; none on older code)."""
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("opsbot_db_pool_") and not line.startswith("opsbot_db_pool_size"):
            name, _, value = line.partition(" ")
            out[name.removeprefix("opsbot_db_pool_").removesuffix("_total")] = float(value)
    return out


async def one_run(*, workers: int, n: int, pg_admin: str, redis_url: str, redis_db: int, kube: KubeApiServer, kubeconfig: str,
                  slack: FakeSlack, tmp: str, timeout: float, profile: str | None = None, tree: Path = ROOT,
                  label: str = "this") -> dict[str, Any]:
    db_url = await create_database(pg_admin, f"e2e_{uuid.uuid4().hex[:10]}")
    redis_url = f"{redis_url.rsplit('/', 1)[0]}/{redis_db}"  # a Redis database of its own per run (rate limits, the queue)
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    config = os.path.join(tmp, f"policy-{prefix}.yaml")
    await asyncio.to_thread(Path(config).write_text, policy(n))
    for i in range(n):  # every run starts from 3 replicas
        d = kube.cluster.get("apps/deployments", "nova", f"svc-{i}")
        d["spec"]["replicas"] = 3
        kube.cluster.update_deployment("nova", f"svc-{i}", d)
    env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": slack.api_url,
           "DATABASE_URL": db_url, "REDIS_URL": redis_url, "KUBECONFIG": kubeconfig, "HOST": "127.0.0.1",
           "OPSBOT_CONFIG": config, "OPSBOT_ACTIONS_QUEUE": f"actions-{prefix}", "LOG_LEVEL": "WARNING", "PYTHONPATH": str(tree)}
    migrated = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "bot", "migrate"], env=env, cwd=tree,
                                       capture_output=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], name: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        log = open(os.path.join(tmp, f"{prefix}-{name}.log"), "wb")  # closed with the process
        p = subprocess.Popen([sys.executable, "-m", "bot", *args], env={**env, "PORT": str(port),
                                                                         "OPSBOT_SPOOL_DIR": os.path.join(tmp, f"{prefix}-{name}")},
                             cwd=tree, stdout=log, stderr=log)
        procs.append(p)
        return p, f"http://127.0.0.1:{port}"

    verifier = SignatureVerifier(SECRET)
    try:
        server, url = start(["serve", "--no-worker"], "server")
        await wait_ready(url, server, tries=600)
        async with aiohttp.ClientSession() as http, \
                await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row) as db:
            sem = asyncio.Semaphore(8)

            async def post(body: str) -> str:
                async with sem, http.post(url + "/slack/events", data=body, headers=_headers(verifier, body)) as r:
                    assert r.status == 200, r.status
                    return await r.text()

            async def command(text: str) -> None:
                # a loaded machine makes opsbot answer some commands "busy" (admission control):
                # sent again, as a person would
                for _ in range(50):
                    if "opsbot is busy" not in await post(slash(slack, text)):
                        return
                    await asyncio.sleep(0.5)

            await asyncio.gather(*(command(f"scale svc-{i} 4") for i in range(n)))
            cards: list[dict[str, Any]] = []
            deadline = time.monotonic() + timeout
            while len(cards) < n and time.monotonic() < deadline:
                cards = await (await db.execute("SELECT id, card_ts FROM ops_requests WHERE card_ts IS NOT NULL")).fetchall()
                await asyncio.sleep(0.2)
            assert len(cards) == n, f"{len(cards)} of {n} cards"
            await asyncio.gather(*(post(approve(slack, c["id"], c["card_ts"])) for c in cards))
            while time.monotonic() < deadline:
                row = await (await db.execute("SELECT count(*) AS n FROM audit_events WHERE event = 'approved'")).fetchone()
                if row and row["n"] >= n:
                    break
                await asyncio.sleep(0.2)
            # every job is on BullMQ now; the workers take them
            ready = [start(["worker"], f"worker-{w}") for w in range(workers)]
            for p, wurl in ready:
                await wait_ready(wurl, p, tries=600)
            # CPU from here to the last success, per execution done in that window (the workers took
            # jobs while starting; their start-up CPU is left out)
            pg_port, redis_port = pg_admin.rsplit(":", 1)[1].split("/")[0], redis_url.rsplit(":", 1)[1].split("/")[0]
            watched = {"serve": (server.pid, False), **{f"worker-{w}": (p.pid, False) for w, (p, _) in enumerate(ready)},
                       "postgres": (find_pid("postgres", f"-p {pg_port}") or 0, True),
                       "redis": (find_pid("redis-server", f":{redis_port}") or 0, False),
                       "bench+emulator+fake Slack": (os.getpid(), False)}
            done0 = await (await db.execute("SELECT count(*) AS n FROM audit_events WHERE event = 'succeeded'")).fetchone()
            pool0 = [await pool_stats(http, wurl) for _, wurl in ready]
            usage = CpuUse(watched)
            stop_waits = asyncio.Event()
            waits = asyncio.create_task(pg_waits(db_url, stop_waits))
            spies = [subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(p.pid), "--format", "raw",
                                       "-d", "20", "-o", f"{profile}-{workers}w-{w}.txt", "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for w, (p, _) in enumerate(ready)] if profile else []
            while time.monotonic() < deadline:
                row = await (await db.execute(  # the state, and its audit row (written just after)
                    "SELECT count(*) AS n FROM audit_events WHERE event = 'succeeded'")).fetchone()
                if row and row["n"] >= n:
                    break
                await asyncio.sleep(0.2)
            cpu = usage.stop()
            pool1 = [await pool_stats(http, wurl) for _, wurl in ready]
            pool_wait = {f"worker-{w}": {k: round(pool1[w].get(k, 0) - pool0[w].get(k, 0), 2) for k in pool1[w]}
                         for w in range(len(ready))}
            # how many jobs each worker really had in flight: the summed claim → success times over the span
            overlap = await (await db.execute(
                """SELECT r.claimed_by AS worker, sum(extract(epoch FROM s.at - b.at)) AS busy,
                          extract(epoch FROM max(s.at) - min(b.at)) AS span, count(*) AS n
                     FROM ops_requests r JOIN audit_events b ON b.request_id = r.id AND b.event = 'started'
                     JOIN audit_events s ON s.request_id = r.id AND s.event = 'succeeded' GROUP BY r.claimed_by""")).fetchall()
            stop_waits.set()
            pg = await waits
            done1 = await (await db.execute("SELECT count(*) AS n FROM audit_events WHERE event = 'succeeded'")).fetchone()
            done_in_window = (done1["n"] if done1 else 0) - (done0["n"] if done0 else 0)
            span = await (await db.execute(
                """SELECT count(*) FILTER (WHERE event = 'succeeded') AS ok,
                          extract(epoch FROM max(at) FILTER (WHERE event = 'succeeded') - min(at) FILTER (WHERE event = 'started'))
                              AS seconds FROM audit_events""")).fetchone()
            states = await (await db.execute("SELECT state, count(*) AS n FROM ops_requests GROUP BY state")).fetchall()
            for spy in spies:
                await asyncio.to_thread(spy.wait, 60)
        assert span is not None
        seconds = float(span["seconds"] or 0.0)
        ok = int(span["ok"])
        scaled = sum(1 for i in range(n) if kube.cluster.get("apps/deployments", "nova", f"svc-{i}")["spec"]["replicas"] == 4)
        per = max(1, done_in_window)
        cpu_ms = {k: round(1000 * v / per, 1) for k, v in cpu["cpu_s"].items()}  # type: ignore[attr-defined]
        return {"code": label, "workers": workers, "kube_latency_ms": [round(1000 * x) for x in kube.latency], "requests": n,
                "succeeded": ok, "scaled": scaled, "seconds": round(seconds, 2),
                "approvals_per_s": round(ok / seconds, 1) if seconds else None,
                "machine_busy_pct": cpu["machine_busy_pct"], "ours_pct": cpu["ours_pct"], "others_cpu_s": cpu["others_cpu_s"],
                "cpu_ms_per_execution": cpu_ms, "cpu_ms_per_execution_total": round(sum(cpu_ms.values()), 1),
                "executions_in_cpu_window": done_in_window, "pg": pg, "db_pool": pool_wait,
                "jobs_in_flight": {str(o["worker"])[-12:]: round(float(o["busy"]) / float(o["span"]), 2) if o["span"] else None
                                   for o in overlap},
                "claim_to_success_ms": round(1000 * sum(float(o["busy"]) for o in overlap) / max(1, sum(int(o["n"]) for o in overlap))),
                "states": {r["state"]: r["n"] for r in states}}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                await asyncio.to_thread(p.wait, 60)
            except subprocess.TimeoutExpired:
                p.kill()


def _trees(spec: str) -> list[tuple[str, Path]]:
    return [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in spec.split(",")]


def _latencies(spec: str) -> list[tuple[float, float]]:
    """"0,5-30" → [(0, 0), (0.005, 0.030)] (milliseconds in, seconds out)."""
    out = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        out.append((float(low) / 1000, float(high or low) / 1000))
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run before giving up")
    ap.add_argument("--profile", help="sample each worker with py-spy (20 s); raw stacks go to PROFILE-<n>w-<i>.txt")
    ap.add_argument("--code", default=f"this={ROOT}", help="label=path of opsbot trees to compare, comma-separated")
    ap.add_argument("--kube-latency", default="0",
                    help="milliseconds each Kubernetes API call waits in the emulator, per mode, comma-separated: "
                         "0 (as fast as it goes: CPU-bound here) and e.g. 5-30 (uniform, like a real API server)")
    args = ap.parse_args()
    trees, latencies = _trees(args.code), _latencies(args.kube_latency)
    slack = await FakeSlack().start()
    results: list[dict[str, Any]] = []
    try:
        with postgres_server(env_var=None) as pg, redis_server(env_var=None) as redis, KubeApiServer() as kube, \
                tempfile.TemporaryDirectory() as tmp:
            for i in range(args.requests):
                kube.cluster.create_deployment("nova", deployment_manifest(f"svc-{i}", "ghcr.io/nova/svc:1", replicas=3,
                                                                           namespace="nova"))
            kubeconfig = kube.kubeconfig(os.path.join(tmp, "kc"), context="nova-prod")
            k = 0
            for _round in range(args.rounds):
                for latency in latencies:
                    kube.latency = latency
                    for label, tree in trees:
                        for workers in (1, 2):
                            k += 1
                            r = await one_run(workers=workers, n=args.requests, pg_admin=pg, redis_url=redis,
                                              redis_db=k % 16, kube=kube, kubeconfig=kubeconfig, slack=slack, tmp=tmp,
                                              timeout=args.timeout, profile=f"{args.profile}-{label}" if args.profile else None,
                                              tree=tree, label=label)
                            r["loadavg"] = round(os.getloadavg()[0], 2)
                            print(json.dumps(r), flush=True)
                            results.append(r)
    finally:
        await slack.stop()
    print(f"\napprovals executed per second end to end ({args.requests} requests per run, `opsbot worker` processes over "
          f"BullMQ, median of {args.rounds}); busy% = the whole machine's CPU use during the run (100 = all "
          f"{os.cpu_count()} cores), cpu ms/exec = opsbot + PostgreSQL + Redis + emulator per execution")
    print(f"{'code':>6} {'kube ms':>8} {'1 worker':>9} {'2 workers':>10} {'ratio':>6} {'busy% 1w':>9} {'busy% 2w':>9} "
          f"{'cpu ms/exec 1w':>15} {'2w':>6}")
    summary = []
    for latency in latencies:
        for label, _ in trees:
            mine = [r for r in results if r["code"] == label and r["kube_latency_ms"] == [round(1000 * x) for x in latency]]
            med = {w: statistics.median(r["approvals_per_s"] or 0 for r in mine if r["workers"] == w) for w in (1, 2)}
            busy = {w: statistics.median(r["machine_busy_pct"] or 0 for r in mine if r["workers"] == w) for w in (1, 2)}
            cpu = {w: statistics.median(r["cpu_ms_per_execution_total"] for r in mine if r["workers"] == w) for w in (1, 2)}
            ratio = round(med[2] / med[1], 2) if med[1] else None
            lat = "-".join(str(round(1000 * x)) for x in sorted(set(latency)))
            print(f"{label:>6} {lat:>8} {med[1]:>9.1f} {med[2]:>10.1f} {ratio or 0:>5.2f}× {busy[1]:>9.0f} {busy[2]:>9.0f} "
                  f"{cpu[1]:>15.1f} {cpu[2]:>6.1f}")
            summary.append({"code": label, "kube_latency_ms": lat, "median": med, "ratio": ratio, "machine_busy_pct": busy,
                            "cpu_ms_per_execution": cpu})
    print(json.dumps({"bench": "workers_e2e", "requests": args.requests, "rounds": args.rounds, "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
