"""Several replicas, as production runs them (manifests/: `opsbot serve --no-worker` ×2 and
`opsbot worker` ×2 on one PostgreSQL and one Redis), proven with real processes:

- the same slash command delivered to both servers (Slack's retry, ``X-Slack-Retry-Num``) opens one
  request; the same Approve click delivered to both counts once;
- two approvers clicking at the same instant on different servers: each click is recorded once, the
  action runs once;
- a worker killed with SIGKILL in the middle of an action: the request ends ``unknown`` (the other
  worker's sweeper notices the stopped heartbeat), never runs twice;
- a server restarted while a request waits for approval: the new process takes the click;
- SIGTERM to a worker in the middle of an action: it finishes it within the grace period;
- and at the end: requests = cards, executions = approvals, the audit chain verifies, and every audit
  row is posted in the audit channel exactly once.

Socket Mode with two connections (two servers with SLACK_APP_TOKEN): Slack hands each envelope to one
connection and may hand it again to another (a retry); each slash command opens one request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psycopg
import pytest_asyncio
import redis
from slack_sdk.signature import SignatureVerifier

from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.servers import free_port
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, BOTH, CAROL, DAN, EXAMPLE, fresh_db
from tests.harness import Harness, click_body, slash_body

T = TypeVar("T")
SECRET = "s3cret"
INCIDENT = Harness.INCIDENT
AUDIT_CHANNEL = "C0AUDIT"
SCALE_PATH = "/apis/apps/v1/namespaces/nova/deployments/nova-worker/scale"


async def eventually(probe: Callable[[], Awaitable[T | None]], *, timeout: float = 20.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.1)


@dataclass
class Process:
    name: str
    args: list[str]
    env: dict[str, str]
    port: int
    proc: asyncio.subprocess.Process | None = None
    output: bytearray = field(default_factory=bytearray)
    _reader: asyncio.Task[None] | None = None

    async def start(self) -> Process:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", *self.args, env=self.env,
                                                         stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read())
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                assert self.proc is not None and self.proc.returncode is None, f"{self.name} exited:\n{self.tail()}"
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False
            await eventually(ready, timeout=40, what=f"{self.name} ready")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.output += chunk

    def tail(self, n: int = 3000) -> str:
        return self.output.decode(errors="replace")[-n:]

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout=timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout=5)
        return code


class Fleet:
    """Two servers and two workers, and what a test reads: the state database, Slack, the cluster."""

    def __init__(self, *, slack: FakeSlack, kube: KubeApiServer, state_db: str, env: dict[str, str]) -> None:
        self.slack, self.kube, self.state_db, self.env = slack, kube, state_db, env
        self.servers: list[Process] = []
        self.workers: list[Process] = []
        self.http = aiohttp.ClientSession()

    def process(self, name: str, args: list[str], **extra: str) -> Process:
        port = free_port()
        return Process(name, args, {**self.env, "PORT": str(port), "OPSBOT_WORKER_ID": name, **extra}, port)

    async def post(self, server: Process, body: str, *, retry: int = 0) -> int:
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": ts,
                   "X-Slack-Signature": SignatureVerifier(SECRET).generate_signature(timestamp=ts, body=body)}
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        async with self.http.post(f"http://127.0.0.1:{server.port}/slack/events", data=body, headers=headers) as r:
            return r.status

    def rows(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.state_db) as conn:
            return conn.execute(query, args).fetchall()  # type: ignore[arg-type]

    def requests(self) -> list[tuple[Any, ...]]:
        return self.rows("SELECT id, state, card_ts, claimed_by FROM ops_requests ORDER BY created_at")

    def events(self, request_id: str) -> list[str]:
        return [r[0] for r in self.rows("SELECT event FROM audit_events WHERE request_id = %s ORDER BY seq", request_id)]

    async def new_request(self, before: int) -> tuple[str, str]:
        async def probe() -> tuple[str, str] | None:
            rows = self.requests()
            return (rows[-1][0], rows[-1][2]) if len(rows) > before and rows[-1][2] else None
        return await eventually(probe, what="the new request's card")

    async def state(self, request_id: str, *states: str, timeout: float = 30.0) -> str:
        async def probe() -> str | None:
            rows = self.rows("SELECT state FROM ops_requests WHERE id = %s", request_id)
            return rows[0][0] if rows and rows[0][0] in states else None
        return await eventually(probe, timeout=timeout, what=f"{request_id} in {states}")

    def patches(self) -> int:
        with self.kube.cluster.lock:
            return sum(1 for method, path, _ in self.kube.cluster.requests if method == "PATCH" and path == SCALE_PATH)


@pytest_asyncio.fixture
async def fleet(slack: FakeSlack, pg_admin: str, platform_db: str, redis_url: str, kube: KubeApiServer,
                kubeconfig: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    state_db = fresh_db(pg_admin)
    own_redis = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own: the default queue prefix is shared
    redis.Redis.from_url(own_redis).flushdb()
    env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": slack.api_url,
           "DATABASE_URL": state_db, "REDIS_URL": own_redis, "KUBECONFIG": kubeconfig, "OPSBOT_CONFIG": str(EXAMPLE),
           "NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": own_redis, "HOST": "127.0.0.1", "OPSBOT_WORKER_LEASE": "15"}
    code = subprocess.run([sys.executable, "-m", "bot", "migrate"], env=env, capture_output=True, timeout=60).returncode
    assert code == 0
    f = Fleet(slack=slack, kube=kube, state_db=state_db, env=env)
    f.servers = [f.process(f"server-{i}", ["serve", "--no-worker"], OPSBOT_SPOOL_DIR=str(tmp_path / f"s{i}")) for i in (1, 2)]
    f.workers = [f.process(f"worker-{i}", ["worker"], OPSBOT_SPOOL_DIR=str(tmp_path / f"w{i}")) for i in (1, 2)]
    await asyncio.gather(*(p.start() for p in [*f.servers, *f.workers]))
    try:
        yield f
    finally:
        kube.faults.clear()
        await asyncio.gather(*(p.stop(signal.SIGKILL) for p in [*f.servers, *f.workers] if p.proc and p.proc.returncode is None),
                             return_exceptions=True)
        await f.http.close()


async def test_two_servers_and_two_workers(fleet: Fleet) -> None:
    one, two = fleet.servers
    figures: dict[str, int] = {}

    # 1. One slash command, delivered to both servers (the second as Slack's retry): one request, one card.
    body = slash_body(fleet.slack, ALICE, "scale worker 4", trigger_id=f"t{uuid.uuid4().hex}")
    assert await asyncio.gather(fleet.post(one, body), fleet.post(two, body, retry=1)) == [200, 200]
    first, card = await fleet.new_request(0)
    await asyncio.sleep(1.0)  # time for a duplicate to show up, if there were one
    assert len(fleet.requests()) == 1 and len(fleet.slack.in_channel(INCIDENT)) == 1
    assert fleet.events(first) == ["requested"]

    # 2. One Approve click, delivered to both servers: counted once, run once.
    click = click_body(fleet.slack, CAROL, first, card)
    assert await asyncio.gather(fleet.post(one, click), fleet.post(two, click, retry=1)) == [200, 200]
    assert await fleet.state(first, "succeeded", "failed", "stale", "unknown") == "succeeded"
    assert fleet.events(first).count("approval_given") == 1 and fleet.events(first).count("started") == 1
    assert fleet.patches() == 1

    # 3. Two approvers at the same instant, each on another server: each click recorded once, one run.
    body = slash_body(fleet.slack, ALICE, "scale worker 5")
    assert await fleet.post(two, body) == 200
    second, card = await fleet.new_request(1)
    await asyncio.gather(fleet.post(one, click_body(fleet.slack, CAROL, second, card)),
                         fleet.post(two, click_body(fleet.slack, DAN, second, card)))
    assert await fleet.state(second, "succeeded", "failed", "stale", "unknown") == "succeeded"
    events = await eventually(lambda: _settled(fleet, second, 2), what="both clicks recorded")
    assert events.count("started") == 1 and events.count("approved") == 1
    assert fleet.patches() == 2

    # 4. A worker killed with SIGKILL in the middle of the action: `unknown`, never run twice.
    fleet.kube.faults.add(method="PATCH", path_re=re.escape(SCALE_PATH), hang=60, times=1)
    assert await fleet.post(one, slash_body(fleet.slack, ALICE, "scale worker 6")) == 200
    third, card = await fleet.new_request(2)
    assert await fleet.post(two, click_body(fleet.slack, CAROL, third, card)) == 200
    await fleet.state(third, "running")
    running_on = fleet.rows("SELECT claimed_by FROM ops_requests WHERE id = %s", third)[0][0]
    victim = next(w for w in fleet.workers if w.name == running_on)
    await eventually(lambda: _async(fleet.patches() == 3), what="the hanging PATCH")
    assert await victim.stop(signal.SIGKILL) == -signal.SIGKILL
    fleet.kube.faults.clear()  # the PATCH it sent may still land: that is what "unknown" means
    assert await fleet.state(third, "succeeded", "failed", "stale", "unknown", timeout=60) == "unknown"
    assert fleet.events(third).count("started") == 1 and "succeeded" not in fleet.events(third)
    await asyncio.sleep(2)
    assert fleet.patches() == 3, "nobody sent it again"
    fleet.workers[fleet.workers.index(victim)] = await fleet.process(victim.name, ["worker"],
                                                                     OPSBOT_SPOOL_DIR=victim.env["OPSBOT_SPOOL_DIR"]).start()

    # 5. A server restarted while a request waits for approval: the new process takes the click.
    assert await fleet.post(one, slash_body(fleet.slack, ALICE, "scale worker 3")) == 200
    fourth, card = await fleet.new_request(3)
    assert await one.stop() == 0
    fleet.servers[0] = one = await fleet.process(one.name, ["serve", "--no-worker"],
                                                 OPSBOT_SPOOL_DIR=one.env["OPSBOT_SPOOL_DIR"]).start()
    assert await fleet.post(one, click_body(fleet.slack, BOTH, fourth, card)) == 200
    assert await fleet.state(fourth, "succeeded", "failed", "stale", "unknown") == "succeeded"

    # 6. SIGTERM to a worker in the middle of an action: it finishes it, within the grace period.
    fleet.kube.faults.add(method="PATCH", path_re=re.escape(SCALE_PATH), hang=3, times=1)
    assert await fleet.post(two, slash_body(fleet.slack, ALICE, "scale worker 7")) == 200
    fifth, card = await fleet.new_request(4)
    assert await fleet.post(one, click_body(fleet.slack, CAROL, fifth, card)) == 200
    await fleet.state(fifth, "running")
    worker = next(w for w in fleet.workers if w.name == fleet.rows("SELECT claimed_by FROM ops_requests WHERE id = %s", fifth)[0][0])
    started = time.monotonic()
    assert await worker.stop(signal.SIGTERM, timeout=15) == 0, worker.tail()
    assert time.monotonic() - started < 12, "stopped within the grace period"
    assert await fleet.state(fifth, "succeeded", "failed", "stale", "unknown") == "succeeded"

    # The ledger: requests = cards, executions = approvals (+ the one lost to SIGKILL, unknown), no duplicates.
    requests = fleet.requests()
    figures["requests"] = len(requests)
    figures["cards"] = len(fleet.slack.in_channel(INCIDENT))
    figures["approved"] = sum(fleet.events(r[0]).count("approved") for r in requests)
    figures["executions"] = sum(fleet.events(r[0]).count("started") for r in requests)
    figures["duplicates"] = sum(max(0, fleet.events(r[0]).count("started") - 1) for r in requests)
    assert figures["requests"] == figures["cards"] == 5
    assert figures["executions"] == figures["approved"] == 5 and figures["duplicates"] == 0
    assert [r[1] for r in requests] == ["succeeded", "succeeded", "unknown", "succeeded", "succeeded"]

    # The audit chain verifies, and the audit channel has every row exactly once.
    verify = subprocess.run([sys.executable, "-m", "bot", "audit", "verify"], env=fleet.env, capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    seqs = [s for (s,) in fleet.rows("SELECT seq FROM audit_events ORDER BY seq")]

    async def posted() -> list[int] | None:
        lines = [m.text for m in fleet.slack.messages if m.channel == AUDIT_CHANNEL]
        found = [int(n) for line in lines for n in re.findall(r"^`#(\d+)`", line, re.M)]  # audit lines, not headlines
        return found if set(found) >= set(seqs) else None
    found = await eventually(posted, timeout=30, what="every audit row in the audit channel")
    figures["audit_rows"], figures["lost_audit_rows"] = len(seqs), len(set(seqs) - set(found))
    twice = sorted({n for n in found if found.count(n) > 1})
    assert not twice, "each line once: " + "\n".join(f"{m.ts} {m.thread_ts} {m.text[:300]}" for m in fleet.slack.messages
                                                      if m.channel == AUDIT_CHANNEL and any(f"`#{n}`" in m.text for n in twice))
    print("replicas:", json.dumps(figures))


async def _settled(fleet: Fleet, request_id: str, clicks: int) -> list[str] | None:
    events = fleet.events(request_id)
    return events if events.count("approval_given") + events.count("vote_refused") >= clicks else None


async def _async(value: T) -> T:
    return value


async def test_socket_mode_with_two_connections_opens_each_request_once(slack: FakeSlack, pg_admin: str, platform_db: str,
                                                                         redis_url: str, kube: KubeApiServer, kubeconfig: str,
                                                                         tmp_path: Path) -> None:
    state_db = fresh_db(pg_admin)
    own_redis = redis_url.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(own_redis).flushdb()
    env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": slack.api_url,
           "SLACK_APP_TOKEN": "xapp-test-token", "DATABASE_URL": state_db, "REDIS_URL": own_redis, "KUBECONFIG": kubeconfig,
           "OPSBOT_CONFIG": str(EXAMPLE), "NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": own_redis, "HOST": "127.0.0.1"}
    assert subprocess.run([sys.executable, "-m", "bot", "migrate"], env=env, capture_output=True, timeout=60).returncode == 0
    fleet = Fleet(slack=slack, kube=kube, state_db=state_db, env=env)
    servers = [fleet.process(f"socket-{i}", ["serve", "--no-worker"], OPSBOT_SPOOL_DIR=str(tmp_path / f"s{i}")) for i in (1, 2)]
    await asyncio.gather(*(p.start() for p in servers))
    try:
        await eventually(lambda: _async(len([ws for ws in slack.sockets if not ws.closed]) == 2), what="two connections")
        envelopes = []
        for n in range(6):
            envelope = {"envelope_id": str(uuid.uuid4()), "type": "slash_commands", "accepts_response_payload": True,
                        "payload": {"team_id": "T0FAKE", "channel_id": INCIDENT, "user_id": (ALICE, BOTH)[n % 2],
                                    "user_name": "someone", "command": "/ops", "text": f"scale worker {n + 4}", "api_app_id": "A0OPS",
                                    "response_url": slack.response_url(f"sock-{n}"), "trigger_id": f"sock.{n}.{uuid.uuid4().hex}"}}
            envelopes.append(envelope)
            used = await slack.socket_send(envelope)
            if n % 3 == 0:  # Slack hands some envelopes again, to the other connection, as a retry
                await slack.socket_send({**envelope, "envelope_id": str(uuid.uuid4()), "retry_attempt": 1,
                                         "retry_reason": "timeout"}, connection=used + 1)
        acked = await eventually(lambda: _async(len(slack.socket_acks) >= 8 and slack.socket_acks), what="every envelope acked")
        assert len(acked) == 8
        try:
            await eventually(lambda: _async(len([r for r in fleet.requests() if r[2]]) >= 6), what="six cards")
        except AssertionError:
            raise AssertionError(f"{fleet.requests()}\n{slack.responses}\n" + "\n".join(p.tail(2000) for p in servers)) from None
        await asyncio.sleep(1.0)  # time for a duplicate to show up, if there were one
        texts = [r[0] for r in fleet.rows("SELECT command_text FROM ops_requests ORDER BY created_at")]
        assert sorted(texts) == sorted(e["payload"]["text"] for e in envelopes)  # type: ignore[index]
        assert len(slack.in_channel(INCIDENT)) == 6
    finally:
        for p in servers:
            assert await p.stop() == 0, p.tail()
        await fleet.http.close()
