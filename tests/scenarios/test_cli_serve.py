"""`opsbot migrate` and `opsbot serve` as a process, configured only through the environment, as
in production: it becomes ready, handles a signed slash command, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import psycopg
from slack_sdk.signature import SignatureVerifier

from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.servers import free_port
from bot.sandbox.slack_api import FakeSlack
from tests.conftest import ALICE, EXAMPLE, fresh_db


async def test_serve_process(slack: FakeSlack, pg_admin: str, platform_db: str, redis_url: str, kubeconfig: str,
                             kube: KubeApiServer, tmp_path: Path) -> None:
    state_db = fresh_db(pg_admin)  # empty: `opsbot migrate` creates the tables
    port = free_port()
    env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": "s3cret", "SLACK_API_URL": slack.api_url,
           "DATABASE_URL": state_db, "REDIS_URL": redis_url, "KUBECONFIG": kubeconfig, "OPSBOT_CONFIG": str(EXAMPLE),
           "NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url, "PORT": str(port), "HOST": "127.0.0.1"}
    migrate = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "migrate", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await migrate.communicate()
    assert migrate.returncode == 0, err.decode()
    assert b"001_requests.sql" in out
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "serve", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "opsbot serve did not become ready"
                await asyncio.sleep(0.2)
            body = urlencode({"command": "/ops", "text": "status worker", "user_id": ALICE, "user_name": "alice",
                              "channel_id": "C0INCIDENT", "team_id": "T0FAKE", "response_url": slack.response_url("cli")})
            ts = str(int(time.time()))
            sig = SignatureVerifier("s3cret").generate_signature(timestamp=ts, body=body)
            headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig,
                       "Content-Type": "application/x-www-form-urlencoded"}
            async with http.post(f"http://127.0.0.1:{port}/slack/events", data=body, headers=headers) as r:
                assert r.status == 200
            deadline = time.monotonic() + 15
            while not any("nova-worker" in r.get("text", "") for r in slack.responses):
                assert time.monotonic() < deadline, "no status reply"
                await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, output.decode()[-2000:]


# ---------------------------------------------------------------------------- the least-privilege app role

def _as_role(url: str, role: str) -> str:
    """``url`` (postgresql://postgres@host:port/db) with another user."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{role}@{rest.partition('@')[2]}"


def _app_role(pg_admin: str) -> str:
    role = "opsbot_app_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    return role


async def _run(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _env(slack: FakeSlack, database_url: str, redis_url: str, kubeconfig: str, platform_db: str, port: int) -> dict[str, str]:
    return {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": "s3cret", "SLACK_API_URL": slack.api_url,
            "DATABASE_URL": database_url, "REDIS_URL": redis_url, "KUBECONFIG": kubeconfig, "OPSBOT_CONFIG": str(EXAMPLE),
            "NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url, "PORT": str(port), "HOST": "127.0.0.1"}


async def test_serve_runs_as_the_least_privilege_app_role(slack: FakeSlack, pg_admin: str, platform_db: str, redis_url: str,
                                                         kubeconfig: str, kube: KubeApiServer) -> None:
    """`opsbot migrate --app-role R` as the owner, then `opsbot serve` as R (PostgreSQL 15: no CREATE on
    schema public): it starts without trying to migrate, and a request is opened and audited."""
    owner_url = fresh_db(pg_admin)
    role = _app_role(pg_admin)
    port = free_port()
    env = _env(slack, _as_role(owner_url, role), redis_url, kubeconfig, platform_db, port)
    # As in the manifests: DATABASE_URL is the app role's, `opsbot migrate` uses DATABASE_OWNER_URL.
    code, out = await _run("migrate", "--app-role", role, env={**env, "DATABASE_OWNER_URL": owner_url})
    assert code == 0 and "001_requests.sql" in out, out
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "serve", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                assert proc.returncode is None, "opsbot serve exited as the app role"
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "opsbot serve did not become ready as the app role"
                await asyncio.sleep(0.2)
            body = urlencode({"command": "/ops", "text": "scale worker 4", "user_id": ALICE, "user_name": "alice",
                              "channel_id": "C0INCIDENT", "team_id": "T0FAKE", "response_url": slack.response_url("app-role")})
            ts = str(int(time.time()))
            headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": SignatureVerifier("s3cret").generate_signature(
                timestamp=ts, body=body), "Content-Type": "application/x-www-form-urlencoded"}
            async with http.post(f"http://127.0.0.1:{port}/slack/events", data=body, headers=headers) as r:
                assert r.status == 200
            deadline = time.monotonic() + 15
            while not any("opsbot_approve" in str(m.blocks) for m in slack.in_channel("C0INCIDENT")):
                assert time.monotonic() < deadline, "no approval card posted as the app role"
                await asyncio.sleep(0.1)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, output.decode()[-2000:]
    with psycopg.connect(owner_url) as conn:
        events = [r[0] for r in conn.execute("SELECT event FROM audit_events ORDER BY seq").fetchall()]
    assert events == ["requested"]


async def test_serve_as_the_app_role_with_a_pending_migration_says_what_to_do(slack: FakeSlack, pg_admin: str, platform_db: str,
                                                                             redis_url: str, kubeconfig: str) -> None:
    owner_url = fresh_db(pg_admin)
    role = _app_role(pg_admin)
    port = free_port()
    code, out = await _run("migrate", "--app-role", role, env=_env(slack, owner_url, redis_url, kubeconfig, platform_db, port))
    assert code == 0, out
    with psycopg.connect(owner_url, autocommit=True) as conn:  # as if a newer opsbot brought 004_delivery.sql
        conn.execute("DELETE FROM opsbot_migrations WHERE name = '004_delivery.sql'")
    code, out = await _run("serve", env=_env(slack, _as_role(owner_url, role), redis_url, kubeconfig, platform_db, port))
    assert code != 0, out
    assert "run `opsbot migrate` as the database owner" in out and "004_delivery.sql" in out, out
    assert "Traceback" not in out, out


async def test_the_worker_process_serves_health_but_not_slack(slack: FakeSlack, pg_admin: str, platform_db: str, redis_url: str,
                                                              kubeconfig: str) -> None:
    """`opsbot worker` (its own Deployment): /healthz, /readyz and /metrics for the probes and
    Prometheus, no Slack endpoint; SIGTERM stops it cleanly."""
    owner_url = fresh_db(pg_admin)
    port = free_port()
    env = _env(slack, owner_url, redis_url, kubeconfig, platform_db, port)
    code, out = await _run("migrate", env=env)
    assert code == 0, out
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "worker", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                assert proc.returncode is None, "opsbot worker exited"
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            checks = (await r.json())["checks"]
                            assert checks["database"] == checks["redis"] == "ok", checks
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "opsbot worker did not become ready"
                await asyncio.sleep(0.2)
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200 and "opsbot_" in await r.text()
            async with http.post(f"http://127.0.0.1:{port}/slack/events", data="x") as r:
                assert r.status in (404, 405)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, output.decode()[-2000:]
