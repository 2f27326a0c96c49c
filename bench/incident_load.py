"""Sustained incident load: mutating commands at a fixed rate, and what became of each (issue 13, item 1).

During an incident many people type `/ops scale …` at once. Every one is acked within Slack's 3 s;
what matters is what happens after the ack: each command must end in an approval card or in an
honest, audited "opsbot is busy" answer, never in a false "… is unavailable" while PostgreSQL and
Redis are healthy.

This starts opsbot as a process, wired like production (real PostgreSQL and Redis, the Kubernetes
emulator, the fake Slack in this process; the worker in the same process), with a policy whose
engineers come from a Slack user group (so the Redis user-group cache is on the path, as in the
report) and whose `scale` needs one approval. For each rate it sends signed `/ops scale worker N`
slash commands open-loop (command i at t0 + i/rate, each on its own connection, as Slack does) for
``--seconds`` seconds, from ``--users`` different people, then waits up to ``--settle`` seconds for
the answers and reads what opsbot did from its database.

Per rate (and per code tree, with ``--code``: several trees in the same run, interleaved):

* ``sent``/``acked``: commands sent, HTTP 200 answers;
* ``cards``: requests opened with their approval card posted (``ops_requests.card_ts``);
* ``busy``: answered "opsbot is busy" (the honest refusal under overload);
* ``unavail``: answered "… is unavailable" (false: both backends are healthy here; must be 0);
* ``other``: any other final answer (a rate or open-request limit, an internal error);
* ``lost``: no card and no final answer by the end of the settle time;
* ``audited``: audit rows of the run's commands whose event is ``requested`` or ``busy``
  (each command should have exactly one);
* p50/p99 command → card: from sending the command to the fake Slack receiving its card.

    .venv/bin/python bench/incident_load.py                                  # 50,150,300 /s for 30 s
    .venv/bin/python bench/incident_load.py --seconds 5 --rates 50,150       # quick
    .venv/bin/python bench/incident_load.py --code main=/work/main,this=.    # before/after, same run

Measured (2 cores shared with other benchmarks, ``--code main=/work/main,this=.``, 30 s per rate,
one run, interleaved):

    code rate/s  sent acked cards  busy unavail lost  card p50  card p99  busy-ack p99
    main     50  1500  1500  1500     0       0    0    128 ms    906 ms     -
    this     50  1500  1500  1473    27       0    0    144 ms    651 ms    128 ms
    main    150  4500  4500  3731     0     769    0   42.6 s    47.2 s      -
    this    150  4500  4500  1600  2900       0    0    520 ms   1576 ms    658 ms
    main    300  9000  7496  2147  2858*   5645 1208   83.5 s   100.1 s      -
    this    300  9000  9000   147  8853       0    0    6.4 s    13.0 s    6.7 s

(* main's "busy" there is its Redis pool's "all 32 connections were in use for 5 s" after a wait.)
At 300/s the Slack edge itself (aiohttp + Bolt's dispatch for each ack, ~5 ms of CPU) takes the
process's core: the busy answers are honest and audited but come late, and few requests open.

Prints a table and, last, one JSON line with every figure. Bounded: each run stops sending after
``--seconds`` and stops waiting after ``--settle``; every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
from aiohttp import web
from psycopg.rows import dict_row
from slack_sdk.signature import SignatureVerifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ack_latency import wait_ready  # noqa: E402
from bot.sandbox.demo import seed_cluster  # noqa: E402
from bot.sandbox.kube_apiserver import KubeApiServer  # noqa: E402
from bot.sandbox.servers import free_port, postgres_server, redis_server  # noqa: E402
from bot.sandbox.slack_api import FakeSlack, Message  # noqa: E402

SECRET = "bench-secret"
CHANNEL = "C0INCIDENT"
STILL_WORKING = "Still working on it"


def policy(users: list[str], max_open: int) -> str:
    return f"""
slack: {{audit_channel: C0AUDIT, allowed_channels: [{CHANNEL}]}}
roles:
  engineer: {{usergroups: [S0ONCALL]}}
  approver: {{users: [U0CAROL]}}
environments:
  production: {{kube_context: nova-prod}}
deployments:
  worker: {{environment: production, namespace: nova, name: nova-worker, replicas: {{min: 1, max: 20}}}}
limits: {{max_open_requests_per_user: {max_open}}}
rules:
  - {{name: read-only, commands: [help, status], allow: [engineer, approver]}}
  - name: production-changes
    commands: [scale]
    allow: [engineer, approver]
    approval: {{from: [approver], count: 1, expires: 15m}}
"""


class TimedSlack(FakeSlack):
    """The fake Slack, with two changes for load: messages are found by (channel, ts) in a dict
    (the fake's list scan is quadratic over a run of thousands of cards), and the time each
    message was posted is kept (command → card)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.by_ts: dict[tuple[str, str], Message] = {}
        self.posted_at: dict[str, float] = {}
        self.answered_at: dict[str, float] = {}

    def _handle(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        if method == "chat.update":
            m = self.by_ts.get((args.get("channel", ""), args.get("ts", "")))
            if m is None:
                return {"ok": False, "error": "message_not_found"}
            m.text, m.blocks = args.get("text", ""), args.get("blocks") or []
            return {"ok": True, "channel": m.channel, "ts": m.ts}
        result = super()._handle(method, args)
        if method == "chat.postMessage" and result.get("ok"):
            m = self.messages.pop()  # kept in the dict only: the list would be scanned by nobody
            self.by_ts[(m.channel, m.ts)] = m
            self.posted_at[m.ts] = time.time()
        elif method == "chat.postEphemeral":
            self.messages.pop()
        return result

    async def _response(self, request: web.Request) -> web.Response:
        answer = await super()._response(request)
        r = self.responses[-1]
        if STILL_WORKING not in r.get("text", ""):
            self.answered_at.setdefault(r["key"], time.time())
        return answer


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


async def create_database(admin_url: str, name: str) -> str:
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def one_run(*, label: str, tree: Path, rate: int, seconds: float, settle: float, users: list[str], pg_admin: str,
                  redis_base: str, redis_db: int, kubeconfig: str, tmp: str, slack: TimedSlack, max_open: int,
                  profile: str | None = None, profile_idle: bool = False) -> dict[str, Any]:
    db_url = await create_database(pg_admin, f"load_{uuid.uuid4().hex[:10]}")
    config_path = os.path.join(tmp, f"policy-{uuid.uuid4().hex[:6]}.yaml")
    await asyncio.to_thread(Path(config_path).write_text, policy(users, max_open))
    port = free_port()
    redis_url = f"{redis_base.rsplit('/', 1)[0]}/{redis_db}"  # a Redis database of its own per run (redis://host:port/0)
    env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": slack.api_url,
           "DATABASE_URL": db_url, "REDIS_URL": redis_url, "KUBECONFIG": kubeconfig, "HOST": "127.0.0.1", "PORT": str(port),
           "OPSBOT_CONFIG": config_path, "OPSBOT_SPOOL_DIR": os.path.join(tmp, f"spool-{uuid.uuid4().hex[:6]}"),
           "LOG_LEVEL": "ERROR", "PYTHONPATH": str(tree)}
    log_path = os.path.join(tmp, f"opsbot-{label}-{rate}.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "bot", "serve"], env=env, cwd=tree, stderr=log_file, stdout=log_file)
    verifier = SignatureVerifier(SECRET)
    url = f"http://127.0.0.1:{port}"
    sent: dict[str, float] = {}
    acked: dict[str, int] = {}
    ack_text: dict[str, str] = {}
    ack_at: dict[str, float] = {}
    trace: list[tuple[float, float | None, float | None]] = []  # (s since the first command, admission bound, in flight)
    stop_sampling = asyncio.Event()
    try:
        await wait_ready(url, proc, tries=600)
        n = int(rate * seconds)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=30)) as http:
            # warm-up: auth.test, the kubeconfig, the pools, the user-group cache (not counted)
            for i in range(3):
                body = _body(users[0], "status worker", f"warm{i}", slack)
                async with http.post(url + "/slack/events", data=body, headers=_sign(verifier, body)) as r:
                    await r.read()
            await asyncio.sleep(1.0)

            async def one(i: int) -> None:
                key = f"{label}-{rate}-{i}-{uuid.uuid4().hex[:6]}"
                user = users[i % len(users)]
                text = f"scale worker {4 + i % 9}"
                body = _body(user, text, key, slack)
                sent[key] = time.time()
                try:
                    async with http.post(url + "/slack/events", data=body, headers=_sign(verifier, body)) as r:
                        raw = await r.read()
                        acked[key] = r.status
                    if raw:  # an answer in the ack itself (opsbot answers "busy" there)
                        try:
                            ack_text[key] = str(json.loads(raw).get("text", ""))
                        except (ValueError, AttributeError):
                            ack_text[key] = raw.decode("utf-8", "replace")
                        ack_at[key] = time.time()
                except (aiohttp.ClientError, TimeoutError):
                    acked[key] = 0

            spy = bench_spy = None
            if profile:  # py-spy samples opsbot while the load is on (collapsed stacks, one line per stack)
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid), "--format", "raw",
                                        "-d", str(int(seconds) + 1), "-o", f"{profile}-{label}-{rate}.txt", "--nonblocking",
                                        *(["--idle"] if profile_idle else [])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                # ...and this process too: the load generator, the fake Slack and the emulator share the cores
                bench_spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()),
                                              "--format", "raw", "-d", str(int(seconds) + 1),
                                              "-o", f"{profile}-{label}-{rate}-bench.txt", "--nonblocking"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu0, own0, machine0 = cpu_seconds(proc.pid), own_cpu_seconds(), machine_cpu()
            pg0 = await pg_cpu_seconds(db_url)
            t0 = time.monotonic()
            sampling = asyncio.ensure_future(sample_bound(url, t0, trace, stop_sampling))
            tasks = []
            for i in range(n):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.gather(*tasks)
            send_seconds = time.monotonic() - t0
            stop_sampling.set()
            await sampling
            cpu_send = cpu_seconds(proc.pid) - cpu0  # opsbot's CPU while the commands came in (acks and the work admitted)
            # ...and everything else's on the same cores: this process (the load generator, the fake Slack and the
            # Kubernetes emulator), PostgreSQL, and the machine as a whole (other work on it included)
            own_send, pg_send = own_cpu_seconds() - own0, await pg_cpu_seconds(db_url) - pg0
            machine_busy, machine_all = (b - a for a, b in zip(machine0, machine_cpu(), strict=True))
            for p in (spy, bench_spy):
                if p is not None:
                    await asyncio.to_thread(p.wait, 60)

            keys = set(sent)
            deadline = time.monotonic() + settle
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row) as db:
                created: dict[str, float] = {}

                async def cards() -> dict[str, str]:
                    rows = await (await db.execute("SELECT delivery_id, card_ts, extract(epoch FROM created_at)::float8 AS created "
                                                   "FROM ops_requests WHERE card_ts IS NOT NULL AND delivery_id IS NOT NULL")).fetchall()
                    created.update({r["delivery_id"]: r["created"] for r in rows})
                    return {r["delivery_id"]: r["card_ts"] for r in rows}

                async def audited() -> int:  # requested or busy rows of this run's commands (the warm-up's are reads)
                    row = await (await db.execute("SELECT count(*) AS n FROM audit_events WHERE event IN ('requested', 'busy')"
                                                  )).fetchone()
                    return int(row["n"]) if row else 0

                while True:
                    got = await cards()
                    done = {k for k in keys if k in got or k in slack.answered_at or k in ack_text}
                    if (len(done) >= len(keys) and await audited() >= len(keys)) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                audit = await (await db.execute("SELECT event, count(*) AS n FROM audit_events GROUP BY event")).fetchall()
        answers: dict[str, str] = dict(ack_text)
        answered_at = {**slack.answered_at, **ack_at}
        for r in slack.responses:
            if r["key"] in keys and STILL_WORKING not in r.get("text", ""):
                answers.setdefault(r["key"], r.get("text", ""))
        carded = {k: ts for k, ts in got.items() if k in keys}
        busy = [k for k, t in answers.items() if k not in carded and "busy" in t]
        unavailable = [k for k, t in answers.items() if k not in carded and "unavailable" in t]
        other = [k for k, t in answers.items() if k not in carded and k not in busy and k not in unavailable]
        lost = [k for k in keys if k not in carded and k not in answers]
        latency = [(slack.posted_at[ts] - sent[k]) * 1000 for k, ts in carded.items() if ts in slack.posted_at]
        # where the time went: command → its request row (ack, parse, user groups, plan, limits) and row → card
        # (audit append, reminders, the postMessage); PostgreSQL's now() and time.time() share this machine's clock
        to_row = [(created[k] - sent[k]) * 1000 for k in carded if k in created]
        row_to_card = [(slack.posted_at[ts] - created[k]) * 1000 for k, ts in carded.items() if ts in slack.posted_at and k in created]
        still_working = sum(1 for r in slack.responses if r["key"] in keys and STILL_WORKING in r.get("text", ""))
        busy_answer = [(answered_at[k] - sent[k]) * 1000 for k in busy if k in answered_at]
        events = {r["event"]: r["n"] for r in audit}
        samples = sorted({answers[k][:160] for k in unavailable + other})[:3]
        return {"code": label, "rate": rate, "seconds": seconds, "send_seconds": round(send_seconds, 2), "sent": len(keys),
                "acked": sum(1 for s in acked.values() if s == 200), "cards": len(carded), "busy": len(busy),
                "unavailable": len(unavailable), "other": len(other), "lost": len(lost),
                "audited_requested": events.get("requested", 0), "audited_busy": events.get("busy", 0),
                "audit_events": events,
                "card_p50_ms": _round(pct(latency, 50)), "card_p99_ms": _round(pct(latency, 99)),
                "busy_answer_p50_ms": _round(pct(busy_answer, 50)), "busy_answer_p99_ms": _round(pct(busy_answer, 99)),
                "to_row_p50_ms": _round(pct(to_row, 50)), "to_row_p99_ms": _round(pct(to_row, 99)),
                "row_to_card_p50_ms": _round(pct(row_to_card, 50)), "row_to_card_p99_ms": _round(pct(row_to_card, 99)),
                "still_working": still_working, "bound": trace_summary(trace, seconds),
                "cpu_ms_per_command": round(cpu_send * 1000 / max(1, len(keys)), 2),
                "cpu_share": {"opsbot": round(cpu_send / send_seconds, 2), "bench": round(own_send / send_seconds, 2),
                              "postgres": round(pg_send / send_seconds, 2),
                              "machine": round(machine_busy / max(1e-9, machine_all) * (os.cpu_count() or 1), 2)},
                "examples": samples}
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def sample_bound(url: str, t0: float, trace: list[tuple[float, float | None, float | None]], stop: asyncio.Event,
                       every: float = 0.1) -> None:
    """Every ``every`` s while the commands are sent: opsbot's admission bound and commands in flight,
    from its /metrics (``opsbot_admission_bound``, ``opsbot_commands_in_flight``; a tree without the
    bound's gauge gives None for it). One keep-alive connection; a scrape the loaded process answers
    late is recorded when it came."""
    wanted = {"opsbot_admission_bound": 1, "opsbot_commands_in_flight": 2}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while not stop.is_set():
            got: list[float | None] = [round(time.monotonic() - t0, 2), None, None]
            try:
                async with http.get(url + "/metrics") as r:
                    for line in (await r.text()).splitlines():
                        name, _, value = line.partition(" ")
                        if name in wanted:
                            got[wanted[name]] = float(value)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            trace.append((float(got[0] or 0.0), got[1], got[2]))
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass


def trace_summary(trace: list[tuple[float, float | None, float | None]], seconds: float) -> dict[str, Any]:
    """The bound over the run: per second its mean and in flight's max, its range over the second
    half, and how often it turned (a fall after a rise, or a rise after a fall, of 5 % or more)."""
    per_s: dict[int, list[tuple[float | None, float | None]]] = {}
    for t, bound, flying in trace:
        if t < seconds + 1:
            per_s.setdefault(int(t), []).append((bound, flying))
    bounds = [b for _, b, _ in trace if b is not None]
    late = [b for t, b, _ in trace if b is not None and t >= seconds / 2]
    turns, direction, last = 0, 0, bounds[0] if bounds else 0.0
    for b in bounds[1:]:
        if abs(b - last) >= 0.05 * max(last, 1.0):
            d = 1 if b > last else -1
            turns += direction != 0 and d != direction
            direction, last = d, b
    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 1) if xs else None
    return {"samples": len(trace), "turns": turns,
            "min": min(bounds, default=None), "max": max(bounds, default=None),
            "late_min": min(late, default=None), "late_max": max(late, default=None), "late_mean": mean(late),
            "per_second_bound": [mean([b for b, _ in v if b is not None]) for _, v in sorted(per_s.items())],
            "per_second_in_flight_max": [max((f for _, f in v if f is not None), default=None) for _, v in sorted(per_s.items())],
            "trace": trace}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process's user + system CPU so far (all its threads: the fake Slack, the emulator, the load)."""
    t = os.times()
    return t.user + t.system


async def pg_cpu_seconds(db_url: str) -> float:
    """PostgreSQL's CPU so far: the postmaster's (with its ended children's) and its live backends'."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        row = await (await conn.execute("SHOW data_directory")).fetchone()
    return _tree_cpu_seconds(Path(str(row[0] if row else ""), "postmaster.pid"))


def _tree_cpu_seconds(pid_file: Path) -> float:
    try:
        master = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == master:
            total += sum(int(f) for f in fields[11:15])
        elif ppid == master:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, all) jiffies of the whole machine so far, from /proc/stat: how much of the cores anything used."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return float(sum(fields[:8]) - idle), float(sum(fields[:8]))


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _body(user: str, text: str, key: str, slack: FakeSlack) -> str:
    return urlencode({"token": "legacy", "team_id": "T0FAKE", "team_domain": "fake", "channel_id": CHANNEL, "channel_name": "incident",
                      "user_id": user, "user_name": user.lower(), "command": "/ops", "text": text, "api_app_id": "A0OPS",
                      "is_enterprise_install": "false", "response_url": slack.response_url(key), "trigger_id": key})


def _sign(verifier: SignatureVerifier, body: str) -> dict[str, str]:
    ts = str(int(time.time()))
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": verifier.generate_signature(timestamp=ts, body=body) or "",
            "Content-Type": "application/x-www-form-urlencoded"}


COLUMNS = [("code", "code", 8), ("rate", "rate/s", 6), ("sent", "sent", 6), ("acked", "acked", 6), ("cards", "cards", 6),
           ("busy", "busy", 6), ("unavailable", "unavail", 7), ("other", "other", 6), ("lost", "lost", 5),
           ("audited_requested", "aud.req", 7), ("audited_busy", "aud.busy", 8),
           ("card_p50_ms", "card p50", 9), ("card_p99_ms", "card p99", 9), ("busy_answer_p99_ms", "busy p99", 9),
           ("cpu_ms_per_command", "cpu ms/cmd", 10), ("still_working", "still-wk", 8),
           ("to_row_p99_ms", "row p99", 8), ("row_to_card_p99_ms", "→card p99", 9)]


def row(r: dict[str, Any]) -> str:
    return " ".join(f"{'-' if r[k] is None else r[k]!s:>{w}}" for k, _, w in COLUMNS)


def _trees(spec: str) -> list[tuple[str, Path]]:
    return [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in spec.split(",")]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="50,150,300", help="commands per second, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long each rate is sustained")
    ap.add_argument("--settle", type=float, default=60.0, help="how long to wait for the last answers after sending")
    ap.add_argument("--users", type=int, default=300, help="how many different people send the commands")
    ap.add_argument("--max-open", type=int, default=100, help="limits.max_open_requests_per_user of the policy")
    ap.add_argument("--profile", help="sample opsbot with py-spy while sending; collapsed stacks go to PROFILE-<code>-<rate>.txt")
    ap.add_argument("--profile-idle", action="store_true",
                    help="with --profile: opsbot's idle stacks too (py-spy --idle: where its event loop waits)")
    ap.add_argument("--code", default=f"this={ROOT}", help="label=path of opsbot trees to compare, comma-separated")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    trees = _trees(args.code)
    users = [f"U0LOAD{i:04d}" for i in range(args.users)]
    slack = await TimedSlack().start()
    slack.usergroups = {"S0ONCALL": users}
    results: list[dict[str, Any]] = []
    try:
        with postgres_server(env_var=None) as pg, redis_server(env_var=None) as redis, KubeApiServer() as kube, \
                tempfile.TemporaryDirectory() as tmp:
            seed_cluster(kube.cluster)
            kubeconfig = kube.kubeconfig(os.path.join(tmp, "kc"), context="nova-prod")
            print(f"incident load: `/ops scale worker N` from {args.users} people, {args.seconds:g} s per rate, "
                  f"opsbot as a process ({', '.join(f'{label}={tree}' for label, tree in trees)})", flush=True)
            print(" ".join(f"{h:>{w}}" for _, h, w in COLUMNS), flush=True)
            redis_db = 0
            for rate in rates:
                for label, tree in trees:
                    redis_db = (redis_db + 1) % 16
                    r = await one_run(label=label, tree=tree, rate=rate, seconds=args.seconds, settle=args.settle, users=users,
                                      pg_admin=pg, redis_base=redis, redis_db=redis_db, kubeconfig=kubeconfig, tmp=tmp, slack=slack,
                                      max_open=args.max_open, profile=args.profile,
                                      profile_idle=args.profile_idle)
                    results.append(r)
                    print(row(r), flush=True)
                    print(f"{'':>8} CPU cores used while sending: " + ", ".join(f"{k} {v}" for k, v in r["cpu_share"].items())
                          + f"; command → row p50 {r['to_row_p50_ms']} ms, row → card p50 {r['row_to_card_p50_ms']} ms", flush=True)
                    b = r["bound"]
                    print(f"{'':>8} admission bound: {b['min']}..{b['max']}, second half {b['late_min']}..{b['late_max']} "
                          f"(mean {b['late_mean']}), {b['turns']} turns, {b['samples']} samples; per second "
                          f"{b['per_second_bound']}; in flight max per second {b['per_second_in_flight_max']}", flush=True)
                    for example in r["examples"]:
                        print(f"{'':>8} e.g. {example!r}", flush=True)
    finally:
        await slack.stop()
    print("false 'unavailable' must be 0; cards + busy + other should equal sent (lost 0).")
    print(json.dumps({"bench": "incident_load", "seconds": args.seconds, "users": args.users, "results": results}))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers it started (the finally blocks) on SIGTERM too
    sys.exit(asyncio.run(main()))
