"""`opsbot migrate` and `opsbot serve` as a process, configured only through the environment, as
in production: it becomes ready, handles a signed slash command, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
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
