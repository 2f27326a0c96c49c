"""Runbook steps on a platform's PostgreSQL, Redis and HTTP health endpoints, from chat (seeds 000–004):
who is connected and what runs long (`pg_stat_activity`), kill a long query with an approval, look at
Redis (`INFO`, `LLEN email_queue`), and check `/healthz`, `/readyz`, `/metrics` — against the real
PostgreSQL and Redis the tests start, and a small HTTP server standing in for the platform.

Every read answers within 2 s, also when its backend is down or has stopped answering, and says
which backend; every bad argument is answered and changes nothing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from psycopg.rows import dict_row

from bot.config import Config, Database, RedisTarget
from bot.domain import OpsRequest
from bot.errors import OutcomeUnknown, Refused
from bot.sandbox.servers import free_port
from commands.db.signal import DbCancel
from tests.conftest import ALICE, BOTH, CAROL, DAN, EVE, MALLORY, example_config
from tests.faults.proxy import TcpProxy
from tests.harness import Harness

APP_ROLE = "nova_app"  # the platform's own (non-superuser) database role
LONG_QUERY = "SELECT pg_sleep(30) /* monthly-report password=hunter2 */"
READ_LIMIT = 2.0  # seconds: what a read-only answer may take, bad backends included


# ---------------------------------------------------------------- the platform: its HTTP endpoints

METRICS = """# HELP nova_api_billing_webhook_total Billing webhook events by status.
# TYPE nova_api_billing_webhook_total counter
nova_api_billing_webhook_total{status="processed"} 1841
nova_api_billing_webhook_total{status="retrying"} 3
nova_api_billing_webhook_total_created 1.7e9
http_requests_total{code="200"} 99
"""


class FakePlatform:
    """Nova's API (`/health`, `/metrics`) and worker (`/worker/healthz`, `/worker/readyz`) on one
    loopback server. ``modes[path]`` changes what a path does: "500", "hang", or a dict to send as JSON."""

    def __init__(self) -> None:
        self.modes: dict[str, Any] = {}
        self.hits: list[str] = []
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        mode = self.modes.get(request.path)
        if mode == "hang":
            await asyncio.wait_for(self.release.wait(), 30)
        if mode == "500":
            return web.json_response({"status": "error", "checks": {"database": "timeout"}}, status=500)
        if isinstance(mode, dict):
            return web.json_response(mode)
        if request.path == "/health":
            return web.json_response({"status": "ok", "version": "1.4.2", "checks": {"database": "ok", "redis": "ok"},
                                      "uptime_seconds": 9000})
        if request.path == "/metrics":
            return web.Response(text=METRICS, content_type="text/plain")
        if request.path == "/worker/healthz":
            return web.json_response({"ok": True})
        if request.path == "/worker/readyz":
            return web.json_response({"ready": True})
        return web.Response(status=404, text="not found")

    async def start(self) -> FakePlatform:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner:
            await self._runner.cleanup()


@pytest_asyncio.fixture
async def platform_http() -> AsyncIterator[FakePlatform]:
    fake = await FakePlatform().start()
    yield fake
    await fake.stop()


@pytest.fixture
def config(platform_db: str, redis_url: str, queue_prefix: str, platform_http: FakePlatform) -> Config:
    """The Nova example, its health probes pointed at the fake platform (NOVA_API_URL / NOVA_WORKER_URL)."""
    return example_config(platform_db, redis_url, queue_prefix,
                          env={"NOVA_API_URL": platform_http.url, "NOVA_WORKER_URL": platform_http.url + "/worker"})


# ---------------------------------------------------------------- the platform: its database sessions

def _as(url: str, role: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{role}@{rest.partition('@')[2]}"


class Sessions:
    """Connections to the platform database as the platform's applications make them."""

    def __init__(self, platform_db: str) -> None:
        self.platform_db = platform_db
        self.conns: list[psycopg.AsyncConnection[Any]] = []
        self.tasks: list[asyncio.Task[Any]] = []

    async def connect(self, app: str = "nova-worker", *, role: str = APP_ROLE) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(_as(self.platform_db, role), application_name=app, autocommit=True)
        self.conns.append(conn)
        return conn

    async def run(self, conn: psycopg.AsyncConnection[Any], sql: str) -> asyncio.Task[Any]:
        """Start ``sql`` on ``conn`` and return once pg_stat_activity shows it running."""
        task = asyncio.create_task(conn.execute(sql))  # type: ignore[arg-type]
        self.tasks.append(task)
        pid = conn.info.backend_pid
        for _ in range(200):
            row = await self.activity(pid)
            if row and row["state"] == "active" and row["query"] == sql:
                return task
            await asyncio.sleep(0.02)
        raise AssertionError(f"{sql!r} did not start on pid {pid}")

    async def activity(self, pid: int) -> dict[str, Any] | None:
        async with await psycopg.AsyncConnection.connect(self.platform_db, row_factory=dict_row, autocommit=True) as admin:
            return await (await admin.execute("SELECT state, query, query_start, backend_start FROM pg_stat_activity "
                                              "WHERE pid = %s", (pid,))).fetchone()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in self.conns:
            await conn.close()


@pytest_asyncio.fixture
async def sessions(platform_db: str) -> AsyncIterator[Sessions]:
    with psycopg.connect(platform_db, autocommit=True) as conn:
        conn.execute(f"DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    s = Sessions(platform_db)
    yield s
    await s.close()


async def timed(bot: Harness, user: str, text: str, containing: str) -> tuple[str, float]:
    """The answer to ``/ops text`` that contains ``containing``, and how long it took from the slash."""
    started = time.monotonic()
    status, body = await bot.slash(user, text)
    assert status == 200, body
    reply = await bot.response(containing=containing, timeout=15)
    return reply["text"], time.monotonic() - started


async def newer_request(bot: Harness, than: str | None = None) -> OpsRequest:
    async def probe() -> OpsRequest | None:
        r = await bot.last_request()
        return r if r is not None and r.id != than and r.card_ts else None
    return await bot.eventually(probe, what="a new request")


async def settled(task: asyncio.Task[Any], timeout: float = 5.0) -> BaseException | None:
    await asyncio.wait({task}, timeout=timeout)
    assert task.done(), "the query is still running"
    return task.exception()


# ---------------------------------------------------------------- db queries → db cancel, through approval

async def test_a_long_query_is_found_then_cancelled_after_approval(bot: Harness, sessions: Sessions) -> None:
    # Seed 001, "High API Latency": find the long query, kill it. The platform's worker runs a report.
    worker = await sessions.connect("nova-worker")
    report = await sessions.run(worker, LONG_QUERY)
    pid = worker.info.backend_pid

    text, took = await timed(bot, ALICE, "/ops db queries app", "non-idle")
    assert took < READ_LIMIT, took
    line = next(line for line in text.splitlines() if f"`{pid}`" in line)
    assert "active" in line and f"user `{APP_ROLE}`" in line and "app `nova-worker`" in line
    assert "SELECT pg_sleep(30) /* monthly-report password=[redacted] */" in line
    assert "hunter2" not in text, "query texts are scrubbed"
    assert "pg_stat_activity" not in text, "opsbot's own session is not listed"
    assert "/ops db cancel app <pid>" in text
    text, _ = await timed(bot, ALICE, "/ops db queries app --over 1h", "no query")
    assert "app: no query has been running for 1h 00m or more" in text

    # The engineer asks; the card shows the session; nothing happens before approval.
    await bot.slash(ALICE, f'/ops db cancel app {pid} --reason "INC-31 report locks invoices"')
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert f"cancel the query of pid {pid} on app: {APP_ROLE} / nova-worker, active for" in card
    assert f"user `{APP_ROLE}`, application `nova-worker`" in card
    assert "query: `SELECT pg_sleep(30) /* monthly-report password=[redacted] */`" in card
    assert "`pg_cancel_backend`: the running query is cancelled" in card and "stale" in card
    assert "environment: *production*" in card and "INC-31" in card
    await asyncio.sleep(0.3)
    assert not report.done(), "nothing is cancelled before approval"

    await bot.click(CAROL, request.id, "approve")
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert isinstance(await settled(report), psycopg.errors.QueryCanceled)
    assert (await (await worker.execute("SELECT 1")).fetchone()) == (1,), "cancel ends the query, not the session"
    assert any(f"query of session {pid} on app cancelled" in m.text for m in bot.slack.thread(Harness.INCIDENT, done.card_ts or ""))

    # The whole story is on record, and no secret from the query text is in it.
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "succeeded"]
    rows = await bot.runtime.audit.log.rows()
    assert "hunter2" not in json.dumps([r["plan"] for r in rows], default=str)
    assert [r["event"] for r in rows if r["request_id"] is None] == ["read", "read"], "the two looks are recorded as reads"


async def test_stale_when_the_pid_runs_another_query_by_the_time_it_is_approved(bot: Harness, sessions: Sessions,
                                                                                platform_db: str) -> None:
    worker = await sessions.connect("nova-worker")
    first = await sessions.run(worker, LONG_QUERY)
    pid = worker.info.backend_pid
    await bot.slash(ALICE, f"/ops db cancel app {pid}")
    request = await bot.requested()

    # Before anyone approves, that query ends and the same session starts another one.
    with psycopg.connect(platform_db, autocommit=True) as admin:
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
    await settled(first)
    second = await sessions.run(worker, "SELECT pg_sleep(30), 'the next job'")

    await bot.click(CAROL, request.id, "approve")
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "stale"
    assert f"session {pid} on database app changed after approval" in (done.error or "")
    assert "query_start was" in (done.error or "")
    await asyncio.sleep(0.5)
    assert not second.done(), "the new query was not cancelled"
    assert (await sessions.activity(pid) or {}).get("state") == "active"
    assert await bot.audit_events(request.id) == ["requested", "approval_given", "approved", "started", "stale"]


async def test_execution_checks_again_on_the_connection_that_sends_the_signal(bot: Harness, sessions: Sessions,
                                                                             platform_db: str) -> None:
    # Between the worker's re-plan and the signal the session may still move on: the execution reads
    # the row again in the transaction that sends the signal, and refuses.
    worker = await sessions.connect("nova-worker")
    first = await sessions.run(worker, LONG_QUERY)
    cmd, ctx = DbCancel(), bot.runtime.pipeline.ctx
    plan = await cmd.plan({"database": "app", "pid": worker.info.backend_pid}, ctx)
    with psycopg.connect(platform_db, autocommit=True) as admin:
        admin.execute("SELECT pg_cancel_backend(%s)", (worker.info.backend_pid,))
    await settled(first)
    second = await sessions.run(worker, "SELECT pg_sleep(30), 'another'")
    with pytest.raises(Refused, match=r"runs another query now .* nothing was sent"):
        await cmd.execute(plan, ctx)
    await asyncio.sleep(0.3)
    assert not second.done()


async def test_a_signal_that_gets_no_answer_is_unknown_not_failed(bot: Harness, sessions: Sessions, platform_db: str) -> None:
    # The database stops answering right as the signal goes out: opsbot cannot know whether it was
    # applied, says so (OutcomeUnknown: the worker records `unknown`, never retries), and does not hang.
    worker = await sessions.connect("nova-worker")
    await sessions.run(worker, LONG_QUERY)
    proxy, via_proxy = await TcpProxy.for_url(platform_db)
    config = bot.runtime.config
    try:
        config.databases["app"] = Database(url=via_proxy, environment="production")
        adapter = bot.runtime.pipeline.ctx.databases
        started = time.monotonic()
        with pytest.raises(OutcomeUnknown, match=r"`pg_cancel_backend\(\d+\)` was sent to database `app` but no answer came back"):
            await adapter.signal_session("app", worker.info.backend_pid, terminate=False, still=lambda row: proxy.pause(),
                                         budget=1.0)
        assert time.monotonic() - started < 1.5
    finally:
        proxy.down()
        await proxy.stop()


async def test_two_fast_approvals_cancel_once(bot: Harness, sessions: Sessions) -> None:
    worker = await sessions.connect("nova-worker")
    report = await sessions.run(worker, LONG_QUERY)
    await bot.slash(ALICE, f"/ops db cancel app {worker.info.backend_pid}")
    request = await bot.requested()
    await asyncio.gather(bot.click(CAROL, request.id), bot.click(DAN, request.id), bot.click(CAROL, request.id))
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    await asyncio.sleep(0.5)  # room for a second execution to show itself
    events = await bot.audit_events(request.id)
    assert events.count("approved") == 1 and events.count("started") == 1 and events.count("succeeded") == 1
    assert isinstance(await settled(report), psycopg.errors.QueryCanceled)


async def test_a_session_idle_in_transaction_cannot_be_cancelled_but_can_be_terminated(bot: Harness, sessions: Sessions) -> None:
    # Seed 004: "look for slow queries or long-running transactions".
    api = await sessions.connect("nova-api")
    await api.set_autocommit(False)
    await api.execute("SELECT 1 AS forgotten_transaction")  # BEGIN…, and the app never commits
    pid = api.info.backend_pid

    text, _ = await timed(bot, ALICE, "/ops db queries app", "non-idle")
    assert f"`{pid}`" in text and "idle in transaction, transaction open" in text
    text, _ = await timed(bot, ALICE, "/ops db sessions app", "connections in use")
    assert "1 idle in transaction" in text

    await bot.slash(ALICE, f"/ops db cancel app {pid}")
    reply = await bot.response(containing="no running query")
    assert f"`/ops db terminate app {pid}` ends the session" in reply["text"]
    assert await bot.last_request() is None

    await bot.slash(ALICE, f"/ops db terminate app {pid}")
    request = await bot.requested()
    card = bot.slack.in_channel(Harness.INCIDENT)[-1].all_text()
    assert f"terminate pid {pid} on app: {APP_ROLE} / nova-api, idle in transaction" in card
    assert "`pg_terminate_backend`: the session is disconnected and its open transaction rolled back" in card
    await bot.click(CAROL, request.id)
    done = await bot.state_of(request.id, "succeeded", "failed", "stale")
    assert done.state.value == "succeeded", done.error
    assert f"session {pid} on app terminated." in (done.result or {}).get("message", "")
    assert await sessions.activity(pid) is None
    with pytest.raises(psycopg.OperationalError):
        await api.execute("SELECT 1")


async def test_db_sessions_counts_connections_against_max_connections(bot: Harness, sessions: Sessions) -> None:
    # Seed 001, "Database Connection Pool Exhausted": `SELECT count(*) FROM pg_stat_activity`, and by whom.
    for _ in range(3):
        await sessions.connect("nova-api")
    worker = await sessions.connect("nova-worker")
    await sessions.run(worker, LONG_QUERY)
    text, took = await timed(bot, EVE, "/ops db sessions app", "connections in use")
    assert took < READ_LIMIT, took
    summary = text.splitlines()[0]
    assert "app:" in summary and "of 200 connections in use" in summary and "here: 1 active" in summary
    assert "this database: 5 connections — 1 active (oldest " in text and ", 3 idle, and opsbot's own" in text
    assert "top applications here: `nova-api` 3 (3 idle); `nova-worker` 1 (1 active)" in text
    assert "other databases on this server:" in text, "opsbot's own state database is counted, not listed"
    assert "reserved for superusers" in text and "left for applications" in text


async def test_what_db_cancel_refuses_to_signal(bot: Harness, sessions: Sessions, platform_db: str, state_db: str) -> None:
    # A superuser's session, opsbot's own connections, another database's session, PostgreSQL's own
    # processes, a pid nobody has: each refused with the reason, no request opened.
    dba = await sessions.connect("psql", role="postgres")
    await sessions.run(dba, "SELECT pg_sleep(30) /* the DBA */")
    lookalike = await sessions.connect("opsbot")
    await sessions.run(lookalike, "SELECT pg_sleep(30) /* opsbot */")
    async with await psycopg.AsyncConnection.connect(platform_db, autocommit=True) as admin:
        checkpointer = (await (await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")).fetchone() or (0,))[0]
        elsewhere = (await (await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s LIMIT 1", (state_db.rpartition("/")[2],))).fetchone() or (0,))[0]
    assert checkpointer and elsewhere
    cases = {
        f"/ops db cancel app {dba.info.backend_pid}": "belongs to superuser `postgres`",
        f"/ops db terminate app {lookalike.info.backend_pid}": "one of opsbot's own connections",
        f"/ops db cancel app {checkpointer}": "PostgreSQL's own `checkpointer` process",
        f"/ops db terminate app {elsewhere}": "is not connected to database `app`",
        "/ops db cancel app 999999": "no session with pid 999999",
    }
    for text, why in cases.items():
        await bot.slash(ALICE, text)
        reply = await bot.response(containing=why)
        assert reply["response_type"] == "ephemeral", text
    assert await bot.last_request() is None
    assert await bot.audit_events() == ["invalid"] * len(cases)


async def test_bad_db_arguments_are_answered_and_change_nothing(bot: Harness, sessions: Sessions) -> None:
    worker = await sessions.connect("nova-worker")
    report = await sessions.run(worker, LONG_QUERY)
    cases = {
        "/ops db cancel app abc": "the pid must be a whole number written with the digits 0-9, got `abc`",
        "/ops db cancel app ٦": "the pid must be written with the digits 0-9; `٦` uses U+0666 ARABIC-INDIC DIGIT SIX. Type `6`.",
        "/ops db terminate app 99999999999": "the pid `99999999999` is too large",
        "/ops db cancel app 0": "the pid must be between 1 and 2147483647",
        "/ops db cancel app -1": "the pid must be a whole number",
        "/ops db cancel app": "needs a pid",
        "/ops db cancel app 1 2": "unexpected argument `2`",
        "/ops db cancel prod 123": "unknown database `prod`. Known databases: app.",
        "/ops db sessions аpp": "contains U+0430 CYRILLIC SMALL LETTER A",
        "/ops db queries app --over soon": "`--over` takes a duration such as 30s, 5m or 2h, got `soon`",
        "/ops db queries app --over ٣٠s": "`--over` takes a duration",
        "/ops db queries app --over 30d": "`--over` takes at most 7d",
        "/ops db queries app --limit 100000": "unknown option `--limit` for `db queries`",
        "/ops db kill app 1": "`db` what? Did you mean",
        "/ops db sessions app\x00": "invisible character (U+0000 NULL)",
        "/ops db sessions app\u202e": "U+202E RIGHT-TO-LEFT OVERRIDE",
        "/ops db cancel app " + "9" * 200_000: "characters long; opsbot reads at most 2,000",
    }
    for text, answer in cases.items():
        status, body = await bot.slash(ALICE, text)
        assert status == 200 and answer in body, (text[:60], body)
    assert await bot.last_request() is None
    assert not report.done(), "nothing was cancelled"


async def test_db_policy_reads_for_auditors_changes_for_engineers(bot: Harness, sessions: Sessions) -> None:
    worker = await sessions.connect("nova-worker")
    await sessions.run(worker, LONG_QUERY)
    await bot.slash(MALLORY, "/ops db queries app")
    assert "you may not run `db-queries`" in (await bot.response(containing="Not allowed"))["text"]
    await bot.slash(EVE, f"/ops db cancel app {worker.info.backend_pid}")
    assert "you may not run `db-cancel`" in (await bot.response(containing="Not allowed"))["text"]
    await bot.slash(BOTH, f"/ops db cancel app {worker.info.backend_pid} --dry-run")
    dry = (await bot.response(containing="Dry run"))["text"]
    assert "cancel the query of pid" in dry and "1 approval from approver required by database-sessions" in dry
    await bot.slash(ALICE, "/ops help db cancel")
    help_text = (await bot.response(containing="db cancel"))["text"]
    assert "/ops db cancel <database> <pid>" in help_text and "needs 1 approval from approver" in help_text
    assert await bot.last_request() is None


async def test_db_reads_answer_within_2s_when_the_database_is_down_or_paused(bot: Harness, platform_db: str) -> None:
    config = bot.runtime.config
    proxy, via_proxy = await TcpProxy.for_url(platform_db)
    try:
        config.databases["app"] = Database(url=via_proxy, environment="production")
        text, took = await timed(bot, ALICE, "/ops db sessions app", "connections in use")
        assert took < READ_LIMIT, "through the proxy it works"

        proxy.pause()  # PostgreSQL stops answering: connections hang
        text, took = await timed(bot, ALICE, "/ops db queries app", "Refused")
        assert "database `app` is unavailable: no answer within 1.5 s" in text and "Nothing was changed" in text
        assert took < READ_LIMIT, took

        proxy.down()  # connections are refused / cut
        text, took = await timed(bot, ALICE, "/ops db sessions app", "Refused")
        assert "database `app` is unavailable" in text
        assert took < READ_LIMIT, took

        config.databases["app"] = Database(url=f"postgresql://postgres@127.0.0.1:{free_port()}/x", environment="production")
        text, took = await timed(bot, ALICE, "/ops db queries app", "Refused")  # nothing listens there
        assert "database `app` is unavailable" in text and took < READ_LIMIT, (text, took)
        assert (await bot.audit_events())[-3:] == ["refused"] * 3
    finally:
        proxy.up()
        await proxy.stop()


# ---------------------------------------------------------------- Redis

@pytest_asyncio.fixture
async def platform_redis(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """The platform's Redis with BullMQ-like keys under a queue name of this test's own."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    queue = "q" + uuid.uuid4().hex[:8]
    yield client, queue
    await client.delete(*[k async for k in client.scan_iter(f"bull:{queue}*")])
    await client.aclose()


async def test_redis_info_shows_memory_clients_traffic_and_role(bot: Harness) -> None:
    # Seed 001: `redis-cli INFO stats` / `INFO memory`.
    text, took = await timed(bot, EVE, "/ops redis info cache", "Redis `cache`")
    assert took < READ_LIMIT, took
    summary, *lines = text.splitlines()
    assert "used" in summary and "clients" in summary and "ops/s" in summary and "role master" in summary
    assert any(line.startswith("• memory: ") and "no maxmemory set" in line and "policy `noeviction`" in line for line in lines)
    assert any(line.startswith("• clients: ") and "connected" in line and "blocked" in line for line in lines)
    assert any(line.startswith("• keys: ") and "evicted" in line and "expired" in line for line in lines)
    assert any(line.startswith("• traffic: ") and "keyspace hit rate" in line for line in lines)
    assert any(line.startswith("• replication: primary, 0 replicas") for line in lines)
    assert any(line.startswith("• server: Redis ") for line in lines)
    assert await bot.audit_events() == ["read"]


async def test_redis_len_reads_an_allowed_key_by_its_type(bot: Harness, platform_redis: tuple[aioredis.Redis, str]) -> None:
    client, queue = platform_redis
    await client.rpush(f"bull:{queue}:wait", "1", "2", "3")
    await client.zadd(f"bull:{queue}:delayed", {"4": 1.0, "5": 2.0})
    await client.xadd(f"bull:{queue}-events:wait", {"event": "added"})
    await client.hset(f"bull:{queue}-meta:wait", mapping={"a": "1"})
    await client.sadd(f"bull:{queue}-set:wait", "x", "y")
    await client.set(f"bull:{queue}-str:wait", "hello")
    expected = {f"bull:{queue}:wait": "3 items", f"bull:{queue}:delayed": "2 members", f"bull:{queue}-events:wait": "1 entry",
                f"bull:{queue}-meta:wait": "1 field", f"bull:{queue}-set:wait": "2 members", f"bull:{queue}-str:wait": "5 bytes"}
    for key, length in expected.items():
        text, took = await timed(bot, ALICE, f"/ops redis len cache {key}", f"`{key}` in Redis `cache`")
        assert f"`{key}` in Redis `cache`: {length}" in text and took < READ_LIMIT, (text, took)

    await bot.slash(ALICE, f"/ops redis len cache bull:{queue}:active")
    assert "does not exist in Redis `cache`" in (await bot.response(containing="does not exist"))["text"]


async def test_redis_len_refuses_keys_outside_the_allow_list(bot: Harness) -> None:
    patterns = "`bull:*:wait`, `bull:*:active`, `bull:*:delayed`, `bull:*:failed`"
    cases = {
        "/ops redis len cache email_queue": "key `email_queue` is not in the allow-list of Redis `cache`. "
                                            f"Keys allowed on `cache`: {patterns}",
        "/ops redis len cache *": "`redis len` takes one exact key name; `*` has a wildcard, which opsbot does not expand",
        "/ops redis len cache bull:*:wait": "has a wildcard",
        "/ops redis len cache bull:x:wait:extra": "is not in the allow-list",
        "/ops redis len cache bull:x:wаit": "contains U+0430 CYRILLIC SMALL LETTER A",
        "/ops redis len cache " + "k" * 600: "a key name has at most 512 characters here, got 600",
        "/ops redis len sessions email_queue": "unknown Redis target `sessions`. Known Redis targets: cache.",
        "/ops redis len cache": "needs a key",
        "/ops redis info cache extra": "unexpected argument `extra`",
        "/ops redis len cache email\x00queue": "invisible character (U+0000 NULL)",
        "/ops redis len cache " + "x" * 200_000: "characters long",
    }
    for text, answer in cases.items():
        status, body = await bot.slash(ALICE, text)
        assert status == 200 and answer in body, (text[:60], body)
    assert patterns in (await bot.slash(ALICE, "/ops redis len cache *"))[1], "the refusal lists the patterns"


async def test_redis_reads_answer_within_2s_when_redis_is_down_or_paused(bot: Harness, redis_url: str) -> None:
    config = bot.runtime.config
    proxy, via_proxy = await TcpProxy.for_url(redis_url)
    try:
        config.redis["cache"] = RedisTarget(url=via_proxy, environment="production", keys=("bull:*:wait",))
        await timed(bot, ALICE, "/ops redis info cache", "Redis `cache`:")
        proxy.pause()
        text, took = await timed(bot, ALICE, "/ops redis len cache bull:x:wait", "Refused")
        assert "Redis `cache` is unavailable: no answer within 1.5 s" in text and took < READ_LIMIT, (text, took)
        config.redis["cache"] = RedisTarget(url=f"redis://127.0.0.1:{free_port()}/0", environment="production")
        text, took = await timed(bot, ALICE, "/ops redis info cache", "Refused")
        assert "Redis `cache` is unavailable" in text and took < READ_LIMIT, (text, took)
    finally:
        proxy.up()
        await proxy.stop()


# ---------------------------------------------------------------- HTTP health probes

async def test_health_of_every_service_in_parallel(bot: Harness, platform_http: FakePlatform) -> None:
    # Seed 003: "post-deploy verification: /health, /metrics, worker /readyz".
    text, took = await timed(bot, ALICE, "/ops health", "health of")
    assert took < READ_LIMIT, took
    summary, *lines = text.splitlines()
    assert summary == "*health of 2 services: all 4 probes healthy*"
    assert lines[0].startswith("• :white_check_mark: `api/health` 200 in ")
    assert 'status=ok version=1.4.2 checks={"database":"ok","redis":"ok"}' in lines[0]
    assert "uptime" not in lines[0], "only status, version, checks and flags are shown"
    assert lines[1].startswith("• :white_check_mark: `api/webhooks` 200 in ")
    assert ('nova_api_billing_webhook_total{status="processed"} 1841; '
            'nova_api_billing_webhook_total{status="retrying"} 3') in lines[1]
    assert "_created" not in lines[1] and "http_requests_total" not in lines[1]
    assert lines[2].startswith("• :white_check_mark: `worker/healthz` 200") and "ok=true" in lines[2]
    assert lines[3].startswith("• :white_check_mark: `worker/readyz` 200") and "ready=true" in lines[3]
    assert sorted(platform_http.hits) == ["/health", "/metrics", "/worker/healthz", "/worker/readyz"]

    platform_http.hits.clear()
    text, _ = await timed(bot, ALICE, "/ops health worker", "health of")
    assert text.splitlines()[0] == "*health of worker: all 2 probes healthy*"
    assert sorted(platform_http.hits) == ["/worker/healthz", "/worker/readyz"], "only that service's probes"
    assert await bot.audit_events() == ["read", "read"]


async def test_health_shows_what_is_wrong_and_does_not_wait_for_a_hung_probe(bot: Harness, platform_http: FakePlatform) -> None:
    platform_http.modes["/worker/readyz"] = "500"
    platform_http.modes["/health"] = "hang"
    platform_http.modes["/worker/healthz"] = {"ok": False, "db_ok": False, "status": "degraded",
                                              "checks": {"db": "postgres://nova:s3cr3t-pw@db:5432/nova"},
                                              "token": "Bearer abcdefghijklmnop"}
    text, took = await timed(bot, ALICE, "/ops health", "health of")
    assert took < READ_LIMIT, took
    lines = text.splitlines()
    assert lines[0] == "*health of 2 services: 1 of 4 probes healthy*"
    assert lines[1] == "• :x: `api/health` no answer within 1 s"
    assert lines[2].startswith("• :white_check_mark: `api/webhooks` 200")
    assert lines[3].startswith("• :warning: `worker/healthz` 200 in ") and "the body says unhealthy" in lines[3]
    assert "ok=false db_ok=false" in lines[3] and "s3cr3t-pw" not in text and "[redacted]" in lines[3]
    assert "abcdefghijklmnop" not in text
    assert lines[4].startswith("• :x: `worker/readyz` 500 in ") and "(expected 200" in lines[4] and "status=error" in lines[4]


async def test_health_of_a_service_that_is_down(bot: Harness) -> None:
    config = bot.runtime.config
    closed = f"http://127.0.0.1:{free_port()}"
    api = config.health["api"]
    config.health["api"] = api.model_copy(update={"probes": tuple(p.model_copy(update={"url": closed + "/health"})
                                                                  for p in api.probes)})
    text, took = await timed(bot, ALICE, "/ops health api", "health of")
    assert took < READ_LIMIT, took
    assert text.splitlines()[0] == "*health of api: 0 of 2 probes healthy*"
    assert "• :x: `api/health` cannot connect" in text


async def test_bad_health_arguments(bot: Harness, platform_http: FakePlatform) -> None:
    cases = {
        "/ops health payments": "unknown service `payments`. Known services with health probes: api, worker.",
        "/ops health wоrker": "contains U+043E CYRILLIC SMALL LETTER O",
        "/ops health api worker": "unexpected argument `worker`; name one service or none",
        "/ops health http://169.254.169.254/latest/meta-data": "unknown service `http://169.254.169.254/latest/meta-data`",
        "/ops health api --url http://evil": "unknown option `--url` for `health`",
        "/ops health \x1b[31mapi": "invisible character (U+001B ESCAPE)",
        "/ops health " + "a" * 200_000: "characters long",
    }
    for text, answer in cases.items():
        status, body = await bot.slash(ALICE, text)
        assert status == 200 and answer in body, (text[:60], body)
    assert platform_http.hits == [], "no probe was called; URLs come from the config only"
    await bot.slash(MALLORY, "/ops health")
    assert "you may not run `health`" in (await bot.response(containing="Not allowed"))["text"]
