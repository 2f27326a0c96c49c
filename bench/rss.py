"""Resident memory of the serving process over many requests: opsbot vs a bare slack-bolt app, same run.

Starts both as processes (opsbot with real PostgreSQL and Redis, the Kubernetes emulator and the
fake Slack; the bare app is bench/bare_bolt.py, which only acks), sends the same signed slash
commands to each (a mix of reads, dry runs, mutating commands that open a request, and usage
errors), ``--concurrency`` at a time, and samples VmRSS after every tenth of ``--requests``.
A leak shows as RSS that keeps growing after the warm-up, where bare Bolt's stays flat.

    .venv/bin/python bench/rss.py                       # 10,000 requests each
    .venv/bin/python bench/rss.py --requests 200        # quick

Prints a table and, last, one JSON line with every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ack_latency import SECRET, fire, rss_mib, wait_ready  # noqa: E402
from bot.sandbox.kube_apiserver import KubeApiServer, deployment_manifest  # noqa: E402
from bot.sandbox.servers import free_port, postgres_server, redis_server  # noqa: E402
from bot.sandbox.slack_api import FakeSlack  # noqa: E402

TEXTS = ["status worker", "scale worker 6 --dry-run", "scale worker 7", "scale wrkr 6", "help"]


def start_apps(env: dict[str, str], slack: FakeSlack, tree: Path = ROOT) -> tuple[dict[str, int], dict[str, subprocess.Popen[bytes]]]:
    """The bare slack-bolt baseline and `opsbot serve`, as processes on their own ports."""
    ports = {"bare slack-bolt": free_port(), "opsbot": free_port()}
    procs = {
        "bare slack-bolt": subprocess.Popen([sys.executable, str(ROOT / "bench/bare_bolt.py"), str(ports["bare slack-bolt"]),
                                             SECRET, slack.api_url], env=env),
        "opsbot": subprocess.Popen([sys.executable, "-m", "bot", "serve"], env={**env, "PORT": str(ports["opsbot"]),
                                                                              "PYTHONPATH": str(tree)}, cwd=tree),
    }
    return ports, procs


def bench_env(pg: str, redis: str, kubeconfig: str, slack: FakeSlack, tmp: str, max_open: int = 100_000) -> dict[str, str]:
    policy = (ROOT / "policies/examples/nova-rms.yaml").read_text()
    config = os.path.join(tmp, "policy.yaml")
    # many mutating commands from one person: the open-request limit would refuse most of them
    Path(config).write_text(policy + f"\nlimits: {{max_open_requests_per_user: {max_open}}}\n")
    return {**os.environ, "SLACK_BOT_TOKEN": "xoxb-test-token", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": slack.api_url,
            "DATABASE_URL": pg, "REDIS_URL": redis, "KUBECONFIG": kubeconfig, "HOST": "127.0.0.1", "OPSBOT_CONFIG": config,
            "NOVA_DATABASE_URL": pg, "NOVA_REDIS_URL": redis, "LOG_LEVEL": "WARNING",
            "OPSBOT_SPOOL_DIR": os.path.join(tmp, "spool")}


def seed(kube: KubeApiServer) -> None:
    kube.cluster.create_deployment("nova", deployment_manifest("nova-worker", "worker:1", replicas=3, namespace="nova"))
    kube.cluster.create_deployment("nova", deployment_manifest("nova-api", "api:1", replicas=3, namespace="nova"))


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--samples", type=int, default=10, help="RSS samples per app over the run")
    ap.add_argument("--tree", default=str(ROOT), help="the opsbot tree to run (e.g. /work/main, to compare)")
    args = ap.parse_args()
    args.tree = str(Path(args.tree).absolute())  # noqa: ASYNC240  # once, before anything runs
    slack = await FakeSlack().start()
    samples: dict[str, list[dict[str, Any]]] = {}
    try:
        with postgres_server(env_var=None) as pg, redis_server(env_var=None) as redis, KubeApiServer() as kube, \
                tempfile.TemporaryDirectory() as tmp:
            seed(kube)
            env = bench_env(pg, redis, kube.kubeconfig(os.path.join(tmp, "kc"), context="nova-prod"), slack, tmp)
            ports, procs = start_apps(env, slack, Path(args.tree))
            try:
                for name, port in ports.items():
                    await wait_ready(f"http://127.0.0.1:{port}", procs[name], tries=600)
                step = max(1, args.requests // args.samples)
                print(f"RSS over {args.requests:,} `/ops` requests ({args.concurrency} at a time; texts: {', '.join(TEXTS)})")
                print(f"{'app':<16} {'requests':>9} {'RSS MiB':>8}")
                for name, port in ports.items():
                    url = f"http://127.0.0.1:{port}"
                    await fire(url, 20, args.concurrency, slack.response_url("warm"), texts=TEXTS)  # warm-up
                    samples[name] = [{"requests": 0, "rss_mib": round(rss_mib(procs[name].pid), 1)}]
                    done = 0
                    while done < args.requests:
                        n = min(step, args.requests - done)
                        await fire(url, n, args.concurrency, slack.response_url("rss"), texts=TEXTS)
                        done += n
                        samples[name].append({"requests": done, "rss_mib": round(rss_mib(procs[name].pid), 1)})
                    await asyncio.sleep(1.0)  # let opsbot finish the work after the last acks
                    samples[name].append({"requests": done, "rss_mib": round(rss_mib(procs[name].pid), 1), "settled": True})
                    for s in samples[name]:
                        print(f"{name:<16} {s['requests']:>9,} {s['rss_mib']:>8.1f}{'  (settled)' if s.get('settled') else ''}")
            finally:
                for p in procs.values():
                    p.terminate()
                    await asyncio.to_thread(p.wait, 60)
    finally:
        await slack.stop()
    summary = {name: {"first_mib": s[0]["rss_mib"], "last_mib": s[-1]["rss_mib"],
                      "growth_after_first_tenth_mib": round(s[-1]["rss_mib"] - s[min(1, len(s) - 1)]["rss_mib"], 1)}
               for name, s in samples.items()}
    for name, v in summary.items():
        print(f"{name:<16} start {v['first_mib']:.1f} MiB → end {v['last_mib']:.1f} MiB "
              f"(growth after the first tenth: {v['growth_after_first_tenth_mib']:+.1f} MiB)")
    print(json.dumps({"bench": "rss", "requests": args.requests, "concurrency": args.concurrency, "summary": summary,
                      "samples": samples}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except aiohttp.ClientError as exc:
        print(f"rss: {exc}", file=sys.stderr)
        sys.exit(1)
