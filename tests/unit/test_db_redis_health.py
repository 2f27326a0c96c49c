"""The pieces of `/ops db|redis|health` that need no database: config checks, allow-list globs, what a
probe's body says, how backend text is made fit for chat, and the bounded wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from bot.adapters.bounded import within
from bot.adapters.http_probe import HttpProbeAdapter
from bot.config import Config, HealthProbe, config_warnings, parse_config
from bot.domain import Actor, DecisionKind, UserId
from bot.errors import BackendUnavailable, ConfigError, UsageError, UserError
from bot.policy.engine import decide
from bot.ports import ProbeResponse
from bot.redaction import scrub_text
from bot.sandbox.servers import free_port
from commands.db import sessions as db_sessions
from commands.http.health import json_excerpt, metric_lines, verdict
from commands.redis import info as redis_info
from commands.registry import command, parse
from commands.shown import span, untrusted
from tests.conftest import example_config

BASE = """
environments: {production: {}, staging: {}}
roles: {eng: {users: [U1]}, approver: {users: [U2]}}
databases: {app: {url: "postgresql://x@db/app", environment: production}}
redis: {cache: {url: "redis://:pw@cache:6379/0", environment: production, keys: [email_queue, "bull:*:wait", "job-?"]}}
health:
  api: {environment: production, probes: [{name: healthz, url: "http://api/healthz"}, {name: m, url: "http://api/metrics", metric: up}]}
  admin: {environment: staging, probes: [{name: healthz, url: "https://admin.example/healthz", expect: 204, timeout: 1.5}]}
"""


def cfg(extra: str = "") -> Config:
    return parse_config(BASE + extra, source="x.yaml", env={})


# ---------------------------------------------------------------- config

@pytest.mark.parametrize(("yaml", "message"), [
    ("redis: {c: {url: 'http://pw@x', environment: production}}", "redis.c.url: must be a redis://, rediss:// or unix:// URL"),
    ("redis: {c: {url: 'redis://x', environment: nowhere}}", "redis.c.environment: environment 'nowhere' is not defined"),
    ("redis: {c: {url: 'redis://x', environment: production, keys: ['bull:[ab]:wait']}}", "uses [ ]; only the wildcards * and ?"),
    ("redis: {c: {url: 'redis://x', environment: production, keys: ['a b']}}", "contains whitespace or control characters"),
    ("redis: {c: {url: 'redis://x', environment: production, keys: ['']}}", "an empty pattern matches no key"),
    ("health: {s: {environment: production, probes: [{name: h, url: 'http://u:pw@api/h'}]}}", "may not carry credentials"),
    ("health: {s: {environment: production, probes: [{name: h, url: 'file:///etc/passwd'}]}}", "is not an http:// or https:// URL"),
    ("health: {s: {environment: production, probes: [{name: h, url: 'http:///h'}]}}", "has no host"),
    ("health: {s: {environment: production, probes: [{name: h, url: 'http://api:99999/h'}]}}", "Port out of range"),
    ("health: {s: {environment: production, probes: [{name: h, url: 'http://api/h', timeout: 5}]}}",
     "health.s.probes[0].timeout: Input should be less than or equal to 1.5"),
    ("health: {s: {environment: production, probes: [{name: h, url: 'http://a/h'}, {name: h, url: 'http://a/i'}]}}",
     "probe name(s) h appear more than once"),
    ("health: {s: {environment: production, probes: [{name: h, url: 'http://a/h', metric: 'up{job=\"x\"}'}]}}",
     "is not a Prometheus metric name"),
    ("health: {s: {environment: production, probes: []}}", "health.s.probes: Tuple should have at least 1 item"),
    ("rules: [{commands: [db-cancel], targets: [nope], allow: [eng]}]", "rules[0].targets: 'nope' is not a deployment"),
    ("rules: [{commands: [db-kill], allow: [eng]}]", "unknown command 'db-kill'"),
])
def test_config_errors_name_the_key(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(yaml)
    assert message in str(info.value)
    assert ":pw@" not in str(info.value), "a Redis URL's password is never echoed"


def test_too_many_probes_in_all() -> None:
    probes = ", ".join(f"{{name: p{i}, url: 'http://a/{i}'}}" for i in range(10))
    services = "\n".join(f"  s{j}: {{environment: production, probes: [{probes}]}}" for j in range(5))
    with pytest.raises(ConfigError, match="50 probes in all; at most 40"):
        parse_config("environments: {production: {}}\nhealth:\n" + services, env={})


def test_env_defaults() -> None:
    text = "environments: {p: {}}\nhealth: {s: {environment: p, probes: [{name: h, url: '${API_URL:-http://api.svc:3000}/healthz'}]}}"
    assert parse_config(text, env={}).health["s"].probes[0].url == "http://api.svc:3000/healthz"
    assert parse_config(text, env={"API_URL": "http://127.0.0.1:9"}).health["s"].probes[0].url == "http://127.0.0.1:9/healthz"
    missing: list[str] = []
    parse_config(text, env={}, missing_env=missing)
    assert missing == [], "a variable with a default is never missing"
    with pytest.raises(ConfigError, match="has an empty default"):
        parse_config("databases: {a: {url: '${DB:-}', environment: p}}\nenvironments: {p: {}}", env={})
    with pytest.raises(ConfigError, match="environment variable DB is not set"):
        parse_config("databases: {a: {url: '${DB}', environment: p}}\nenvironments: {p: {}}", env={})


def test_key_allow_list_globs() -> None:
    target = cfg().redis["cache"]
    assert target.allows("email_queue") and target.allows("bull:emails:wait") and target.allows("bull:a:b:wait")
    assert target.allows("job-1") and not target.allows("job-12")
    assert not target.allows("email_queue2") and not target.allows("bull:emails:active") and not target.allows("EMAIL_QUEUE")
    assert not target.allows("xbull:a:wait") and not target.allows("bull:a:wait\n")


def test_rules_can_name_databases_redis_targets_and_health_services() -> None:
    config = cfg("""
rules:
  - {commands: [audit], allow: [eng]}
  - {commands: [db-sessions, db-queries, redis-info, redis-len], targets: [app, cache], allow: [eng]}
  - {commands: [db-cancel, db-terminate], targets: [databases], allow: [eng], approval: {from: [approver]}}
  - {commands: [health], targets: [api], allow: [eng]}
  - {commands: [health], targets: [health], environments: [staging], allow: [approver]}
""")
    assert config_warnings(config) == ["slack.audit_channel: not set; the audit trail is kept in PostgreSQL only"]
    eng, approver = Actor(UserId("U1")), Actor(UserId("U2"))

    def decision(text: str, actor: Actor) -> DecisionKind:
        inv = parse(text, config)
        plan = command(inv.command).locate(inv.params, config)
        assert plan is not None
        return decide(plan, actor, config).kind

    assert decision("db cancel app 42", eng) is DecisionKind.NEEDS_APPROVAL
    assert decision("db queries app", eng) is DecisionKind.ALLOW
    assert decision("redis len cache email_queue", eng) is DecisionKind.ALLOW
    assert decision("health api", eng) is DecisionKind.ALLOW
    assert decision("health", eng) is DecisionKind.DENY, "all services is not the service `api`"
    assert decision("health admin", approver) is DecisionKind.ALLOW
    assert decision("health api", approver) is DecisionKind.DENY, "api is in production"
    assert decision("health", approver) is DecisionKind.DENY, "services in several environments: no environment rule matches"


def test_warnings_for_a_bare_star_and_redis_len_without_keys() -> None:
    config = parse_config("""
environments: {production: {}}
roles: {eng: {users: [U1]}}
redis: {all: {url: "redis://x", environment: production, keys: ["*"]}, bare: {url: "redis://y", environment: production}}
rules: [{name: len, commands: [redis-len], targets: [bare], allow: [eng]}]
""", env={})
    warnings = "\n".join(config_warnings(config))
    assert "redis.all.keys: a bare `*` allows every key" in warnings
    assert "rules[0] (len): can never match: redis-len: no configured target is in targets ['bare']" in warnings


# ---------------------------------------------------------------- grammar

@pytest.mark.parametrize(("text", "answer"), [
    ("db cancel app ６", "the pid must be written with the digits 0-9; `６` uses U+FF16 FULLWIDTH DIGIT SIX. Type `6`."),
    ("db cancel app 1e3", "the pid must be a whole number"),
    ("db cancel app 0x10", "the pid must be a whole number"),
    ("db terminate app 3000000000", "the pid `3000000000` is too large. `/ops db queries app` lists the pids."),
    ("db queries app --over=-5s", "`--over` takes a duration"),
    ("db", "`db` what? Did you mean: `/ops db sessions <database>` or `/ops db queries <database> [--over 30s]`"),
    ("redis", "`redis` what?"),
    ("redis len cache bull:?:wait", "has a wildcard"),
    ("redis len cache [a]", "has a wildcard"),
    ("redis len cache bull:x:wait <!channel>", "unexpected argument `<!channel>`"),
])
def test_bad_arguments(text: str, answer: str) -> None:
    with pytest.raises(UserError) as info:
        parse(text, cfg())
    assert answer in str(info.value)


def test_words_are_case_insensitive_and_flags_typed() -> None:
    config = cfg()
    assert parse("DB Queries app --over 90s", config).params == {"database": "app", "over_seconds": 90}
    assert parse("db queries app --over 45", config).params["over_seconds"] == 45
    assert parse("health", config).params == {"service": None}
    assert parse("redis len cache bull:emails:wait", config).params == {"target": "cache", "key": "bull:emails:wait"}
    with pytest.raises(UsageError, match="`--over` is given twice"):
        parse("db queries app --over 1s --over 2s", config)


def test_the_example_config_routes_every_new_command() -> None:
    config = example_config("postgresql://x@127.0.0.1/x", "redis://127.0.0.1:1/0", "bull")
    for text in ("db sessions app", "db queries app", "db cancel app 7", "db terminate app 7", "redis info cache",
                 "redis len cache bull:billing-webhooks:wait", "health", "health worker"):
        inv = parse(text, config)
        plan = command(inv.command).locate(inv.params, config)
        assert plan is not None and plan.environment == "production", text
        assert decide(plan, Actor(UserId("U0ALICE")), config).allowed, text
    assert config.health["api"].probes[0].url == "http://nova-api.nova.svc.cluster.local:3000/health"


# ---------------------------------------------------------------- what is shown

def test_untrusted_text_is_scrubbed_bounded_and_cannot_ping_or_break_out() -> None:
    assert untrusted("SELECT 1 /* <!channel> <@U123> & `x` */", 100) == "SELECT 1 /* &lt;!channel&gt; &lt;@U123&gt; &amp; 'x' */"
    assert untrusted("a\n\n  b\tc", 100) == "a b c"
    cut = untrusted("UPDATE t SET password='hunter2-very-long-secret' WHERE " + "x" * 500, 40)
    assert len(cut) <= 40 and cut.endswith("…") and "hunter2" not in cut and "[redacted]" in cut
    text = "password=[redacted] and token=abc123"
    assert scrub_text(scrub_text(text)) == scrub_text(text) == "password=[redacted] and token=[redacted]", "idempotent"


def test_span() -> None:
    assert [span(x) for x in (None, 0.04, 9.96, 59, 61, 3599, 3600 * 5 + 7 * 60, 86400 * 3 + 3600)] == \
        ["?", "0.0s", "10.0s", "59s", "1m 01s", "59m 59s", "5h 07m", "3d 01h"]


def test_json_excerpt() -> None:
    said = json_excerpt('{"status": "ok", "version": "1.2", "checks": {"db": "ok"}, "ok": true, "db_ok": true, "n": 3}')
    assert said == ('status=ok version=1.2 checks={"db":"ok"} ok=true db_ok=true', False)
    assert json_excerpt('{"ok": true, "db_ok": false}') == ("ok=true db_ok=false", True)
    assert json_excerpt('{"status": "DOWN"}') == ("status=DOWN", True)
    assert json_excerpt('{"status": "degraded", "migrations_ok": true}') == ("status=degraded migrations_ok=true", False)
    assert json_excerpt('{"checks": {"x": "' + "y" * 500 + '"}}')[0].__len__() < 200  # type: ignore[index]
    assert json_excerpt("[1, 2]") is None and json_excerpt("OK") is None
    assert json_excerpt("{}") == ("a JSON object without status, version or checks", False)


def test_metric_lines() -> None:
    body = "# HELP up x\n# TYPE up gauge\nup 1\nup{job=\"a\"} 0\nupstream_errors 4\nprocess_up 1\n"
    assert metric_lines(body, "up") == ["up 1", 'up{job="a"} 0']
    assert metric_lines(body, "missing") == []
    assert len(metric_lines("\n".join(f"m{{i=\"{i}\"}} {i}" for i in range(50)), "m")) == 5


def _probe(**kw: Any) -> HealthProbe:
    return HealthProbe.model_validate({"name": "p", "url": "http://a/p", **kw})


def test_verdicts() -> None:
    ok = ProbeResponse(status=200, seconds=0.012, content_type="application/json", body='{"status":"ok"}')
    assert verdict(_probe(), ok) == (":white_check_mark:", "200 in 12 ms — status=ok")
    assert verdict(_probe(expect=204), ok)[0] == ":x:" and "expected 204" in verdict(_probe(expect=204), ok)[1]
    moved = ProbeResponse(status=301, seconds=0.001, body="")
    assert verdict(_probe(), moved) == (":x:", "301 in 1 ms (a redirect (not followed))")
    assert verdict(_probe(expect=301), moved)[0] == ":white_check_mark:"
    text = ProbeResponse(status=200, seconds=0.002, body="OK\nmore")
    assert verdict(_probe(), text) == (":white_check_mark:", "200 in 2 ms — OK")
    metrics = ProbeResponse(status=200, seconds=0.002, body="other 1\n", truncated=True)
    icon, said = verdict(_probe(metric="process_open_fds"), metrics)
    assert icon == ":x:" and "metric process_open_fds is not in the body (read the first 2 MiB)" in said
    big = ProbeResponse(status=200, seconds=0.002, body='{"status": "ok", "x": "' + "y" * 100, truncated=True)
    assert verdict(_probe(), big) == (":white_check_mark:", "200 in 2 ms — a JSON body over 64 KiB (not read)")
    down = ProbeResponse(status=None, seconds=0.001, error="cannot connect: Connect call failed <@U1>")
    assert verdict(_probe(), down) == (":x:", "cannot connect: Connect call failed &lt;@U1&gt;")


def test_redis_info_warnings() -> None:
    summary, lines, facts = redis_info.describe("cache", {
        "used_memory": 950 * 1024**2, "used_memory_peak": 990 * 1024**2, "maxmemory": 1000 * 1024**2, "maxmemory_policy": "noeviction",
        "connected_clients": 40, "blocked_clients": 2, "evicted_keys": 0, "expired_keys": 10, "instantaneous_ops_per_sec": 120,
        "keyspace_hits": 90, "keyspace_misses": 10, "role": "slave", "master_host": "10.0.0.1", "master_port": 6379,
        "master_link_status": "down", "rejected_connections": 3, "redis_version": "7.2.4", "uptime_in_seconds": 90000,
        "db0": {"keys": 1234, "expires": 5}})
    assert summary == "Redis `cache`: 950.0 MiB used of 1000.0 MiB, 40 clients, 120 ops/s, role slave"
    assert lines[0] == ":warning: memory at 95% of maxmemory with policy `noeviction`: writes will be refused (OOM)"
    assert ":warning: the replica's link to its primary is down" in lines
    assert ":warning: 3 connections rejected since start (maxclients reached)" in lines
    assert "keys: db0 1,234; since start 0 evicted, 10 expired" in lines
    assert "traffic: 120 ops/s now; keyspace hit rate 90.0% (90 hits, 10 misses)" in lines
    assert "replication: replica of 10.0.0.1:6379, link down" in lines
    assert facts["role"] == "slave" and facts["used_memory"] == 950 * 1024**2


def test_db_sessions_warns_near_max_connections() -> None:
    groups = [{"here": True, "backend_type": "client backend", "state": "idle", "application": "api", "n": 70, "oldest_seconds": 5.0},
              {"here": True, "backend_type": "client backend", "state": None, "application": "", "n": 5, "oldest_seconds": None},
              {"here": False, "backend_type": "client backend", "state": "idle", "application": "x", "n": 4, "oldest_seconds": 1.0},
              {"here": None, "backend_type": "checkpointer", "state": None, "application": "", "n": 1, "oldest_seconds": None}]
    summary, lines, facts = db_sessions.describe("app", {"max_connections": 100, "reserved": 3, "groups": groups})
    assert summary == "app: 80 of 100 connections in use (80%); here: 5 hidden"
    assert lines[0].startswith(":warning: 80 of the 97 connections applications may open are in use (82%)")
    assert "5 sessions of other roles show no state: grant opsbot's database role `pg_read_all_stats` to see them" in lines
    assert "PostgreSQL's own processes (not counted against max_connections): 1" in lines
    assert facts["used"] == 80 and facts["here"] == 76


# ---------------------------------------------------------------- the bounded wait and the HTTP client

async def test_within_answers_at_the_deadline_even_when_the_call_is_slow_to_cancel() -> None:
    finished = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # like psycopg sending a cancel request to a server that does not answer
            finished.set()
            raise

    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"database `x` is unavailable: no answer within 0\.1 s"):
        await within(0.1, stubborn(), backend="database `x`")
    assert time.monotonic() - started < 0.3
    await asyncio.wait_for(finished.wait(), 2)  # and it did get to clean up
    assert await within(1, asyncio.sleep(0, result=7), backend="b") == 7


@pytest_asyncio.fixture
async def server() -> AsyncIterator[str]:
    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    async def big(_: web.Request) -> web.Response:
        return web.Response(text="x" * 100_000)

    async def slow_body(_: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(_)
        await resp.write(b"partial")
        await asyncio.sleep(3)
        return resp

    app = web.Application()
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/big", big)
    app.router.add_get("/slow-body", slow_body)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


async def test_http_probe_adapter(server: str) -> None:
    probes = HttpProbeAdapter()
    try:
        moved = await probes.get(server + "/redirect", timeout=1, max_bytes=1000)
        assert moved.status == 302, "redirects are not followed"
        big = await probes.get(server + "/big", timeout=1, max_bytes=1000)
        assert big.status == 200 and big.truncated and len(big.body) == 1000
        started = time.monotonic()
        slow = await probes.get(server + "/slow-body", timeout=0.3, max_bytes=1000)
        assert slow.status is None and slow.error == "the body did not arrive within 0.3 s" and time.monotonic() - started < 0.6
        refused = await probes.get(f"http://127.0.0.1:{free_port()}/x", timeout=1, max_bytes=1000)
        assert refused.status is None and refused.error.startswith("cannot connect")
    finally:
        await probes.close()
