"""Start-up time: process start → `/readyz` 200 for `opsbot serve`, vs a bare slack-bolt app's
process start → listening (its `/readyz` answers as soon as aiohttp listens), in the same run.

Each round starts both processes one after the other (interleaved, so machine noise hits both) and
polls every 10 ms. opsbot's figure includes the Python imports, reading and checking the policy,
loading the kubeconfig, opening the PostgreSQL pool and checking that every migration is applied,
and the readiness probe's own database and Redis round trips. The migrations are applied once
before the first round (`opsbot migrate`), as the init container does in production.

    .venv/bin/python bench/startup.py                  # 10 rounds
    .venv/bin/python bench/startup.py --rounds 3       # quick
    .venv/bin/python bench/startup.py --rounds 4 --code main=/work/main,this=.   # two trees, same run

Prints a table and, last, one JSON line with every figure.
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
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ack_latency import SECRET  # noqa: E402
from bench.rss import bench_env, seed  # noqa: E402
from bot.sandbox.kube_apiserver import KubeApiServer  # noqa: E402
from bot.sandbox.servers import free_port, postgres_server, redis_server  # noqa: E402
from bot.sandbox.slack_api import FakeSlack  # noqa: E402


async def time_to_ready(cmd: list[str], env: dict[str, str], url: str, *, timeout: float = 60.0, cwd: Path = ROOT) -> float:
    """Seconds from starting ``cmd`` (in ``cwd``) to its first `/readyz` 200; the process is stopped after."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while time.perf_counter() - started < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[1:3]} exited with {proc.returncode} before it was ready")
                try:
                    async with http.get(url + "/readyz") as r:
                        if r.status == 200:
                            return time.perf_counter() - started
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.01)
        raise RuntimeError(f"{cmd[1:3]} not ready after {timeout} s")
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--code", default=f"opsbot={ROOT}",
                    help="name=tree,… : the opsbot trees to time, each in every round (e.g. main=/work/main,this=.)")
    args = ap.parse_args()
    trees = {name: Path(tree).absolute() for name, _, tree in (c.partition("=") for c in args.code.split(","))}  # noqa: ASYNC240
    slack = await FakeSlack().start()
    times: dict[str, list[float]] = {"bare slack-bolt": [], **{name: [] for name in trees}}
    try:
        with postgres_server(env_var=None) as pg, redis_server(env_var=None) as redis, KubeApiServer() as kube, \
                tempfile.TemporaryDirectory() as tmp:
            seed(kube)
            env = bench_env(pg, redis, kube.kubeconfig(os.path.join(tmp, "kc"), context="nova-prod"), slack, tmp)
            migrated = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "bot", "migrate"], env=env, cwd=ROOT,
                                               capture_output=True, timeout=120)
            if migrated.returncode != 0:
                print(migrated.stderr.decode(errors="replace"), file=sys.stderr)
                return 1
            print(f"start-up: process start → /readyz 200, {args.rounds} rounds, interleaved")
            for _ in range(args.rounds):
                port = free_port()
                times["bare slack-bolt"].append(await time_to_ready(
                    [sys.executable, str(ROOT / "bench/bare_bolt.py"), str(port), SECRET, slack.api_url], env,
                    f"http://127.0.0.1:{port}"))
                for name, tree in trees.items():
                    port = free_port()
                    times[name].append(await time_to_ready([sys.executable, "-m", "bot", "serve"],
                                                           {**env, "PORT": str(port), "PYTHONPATH": str(tree)},
                                                           f"http://127.0.0.1:{port}", cwd=tree))
    finally:
        await slack.stop()
    print(f"{'app':<16} {'median s':>9} {'min s':>7} {'max s':>7}")
    summary = {}
    for name, values in times.items():
        summary[name] = {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
                         "max_s": round(max(values), 3)}
        print(f"{name:<16} {summary[name]['median_s']:>9.3f} {summary[name]['min_s']:>7.3f} {summary[name]['max_s']:>7.3f}")
    ratios = {name: round(summary[name]["median_s"] / summary["bare slack-bolt"]["median_s"], 2) for name in trees}
    print(f"{', '.join(f'{n} {r:.2f}×' for n, r in ratios.items())} bare slack-bolt (medians); "
          f"load average {os.getloadavg()[0]:.2f}")
    ratio = next(iter(ratios.values()))
    print(json.dumps({"bench": "startup", "rounds": args.rounds, "summary": summary, "ratio": round(ratio, 2), "ratios": ratios,
                      "loadavg": os.getloadavg()[0], "times_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
