"""Ack latency and memory: opsbot vs a bare slack-bolt app, in the same run.

Slack wants the HTTP 200 for a slash command within 3 s; opsbot promises its ack never waits on
Kubernetes, the databases or the queue. This starts both apps as processes (opsbot with real
PostgreSQL and Redis, the Kubernetes emulator and the fake Slack), sends the same signed slash
commands to each, and prints latency percentiles and resident memory side by side.

    .venv/bin/python bench/ack_latency.py [--requests 300] [--concurrency 1,10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from slack_sdk.signature import SignatureVerifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.sandbox.kube_apiserver import KubeApiServer, deployment_manifest  # noqa: E402
from bot.sandbox.servers import free_port, postgres_server, redis_server  # noqa: E402
from bot.sandbox.slack_api import FakeSlack  # noqa: E402

SECRET = "bench-secret"
TEXTS = ["status worker", "scale worker 6 --dry-run", "scale wrkr 6", "help"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, *, tries: int = 300) -> None:
    """Poll ``/readyz`` every 0.1 s; fail at once if ``proc`` (the app under test) exits first."""
    async with aiohttp.ClientSession() as http:
        for _ in range(tries):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"opsbot exited with {proc.returncode} before it was ready")
            try:
                async with http.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never became ready")


async def fire(url: str, n: int, concurrency: int, response_url: str, *, texts: list[str] = TEXTS) -> list[float]:
    verifier = SignatureVerifier(SECRET)
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        body = urlencode({"command": "/ops", "text": texts[i % len(texts)], "user_id": "U0ALICE", "user_name": "alice",
                          "channel_id": "C0INCIDENT", "team_id": "T0FAKE", "response_url": response_url})
        ts = str(int(time.time()))
        headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": verifier.generate_signature(timestamp=ts, body=body),
                   "Content-Type": "application/x-www-form-urlencoded"}
        async with sem:
            started = time.perf_counter()
            async with http.post(url + "/slack/events", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one(i, http) for i in range(n)))
    return latencies


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", default="1,10")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    slack = await FakeSlack().start()
    with postgres_server() as pg, redis_server() as redis, KubeApiServer() as kube, tempfile.TemporaryDirectory() as tmp:
        kube.cluster.create_deployment("nova", deployment_manifest("nova-worker", "worker:1", replicas=3, namespace="nova"))
        kube.cluster.create_deployment("nova", deployment_manifest("nova-api", "api:1", replicas=3, namespace="nova"))
        kubeconfig = kube.kubeconfig(os.path.join(tmp, "kc"), context="nova-prod")
        env = {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": slack.api_url,
               "DATABASE_URL": pg, "REDIS_URL": redis, "KUBECONFIG": kubeconfig, "HOST": "127.0.0.1",
               "OPSBOT_CONFIG": str(ROOT / "policies/examples/nova-rms.yaml"), "NOVA_DATABASE_URL": pg, "NOVA_REDIS_URL": redis,
               "LOG_LEVEL": "WARNING"}
        ports = {"bare slack-bolt": free_port(), "opsbot": free_port()}
        procs = {
            "bare slack-bolt": subprocess.Popen([sys.executable, str(ROOT / "bench/bare_bolt.py"), str(ports["bare slack-bolt"]),
                                                 SECRET, slack.api_url], env=env),
            "opsbot": subprocess.Popen([sys.executable, "-m", "bot", "serve"], env={**env, "PORT": str(ports["opsbot"])}, cwd=ROOT),
        }
        try:
            for port in ports.values():
                await wait_ready(f"http://127.0.0.1:{port}")
            print(f"ack latency of `/ops` slash commands ({args.requests} requests per run; texts: {', '.join(TEXTS)})")
            print(f"{'app':<16} {'conc':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8} {'RSS MiB':>8}")
            for conc in levels:
                for name, port in ports.items():
                    url = f"http://127.0.0.1:{port}"
                    await fire(url, 20, conc, slack.response_url("warm"))  # warm-up (auth.test, imports, pools)
                    lat = await fire(url, args.requests, conc, slack.response_url("bench"))
                    print(f"{name:<16} {conc:>4} {pct(lat, 50):>8.2f} {pct(lat, 95):>8.2f} {pct(lat, 99):>8.2f} "
                          f"{max(lat):>8.2f} {statistics.mean(lat):>8.2f} {rss_mib(procs[name].pid):>8.1f}")
            print("Slack's limit is 3000 ms; absolute numbers on shared machines are noisy, compare the two rows.")
        finally:
            for p in procs.values():
                p.terminate()
                # wait without blocking the event loop: the fake Slack must keep answering while opsbot drains
                await asyncio.to_thread(p.wait, 60)
            await slack.stop()


if __name__ == "__main__":
    asyncio.run(main())
