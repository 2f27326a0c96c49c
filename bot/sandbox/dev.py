"""`opsbot dev`: the whole product on one laptop, with no Slack workspace and no cluster.

Starts, all on 127.0.0.1: PostgreSQL and Redis (the URLs from DATABASE_URL/REDIS_URL when set,
otherwise private servers whose data lives in ``--data-dir``, stopped on exit and reused next
time), the Kubernetes API emulator seeded with Nova's deployments and their revision history, the
demo platform database, BullMQ queue and HTTP health endpoints, the Slack emulator with the browser playground, and the
real opsbot app (the same Runtime `opsbot serve` builds) pointed at them through SLACK_API_URL and
a kubeconfig, exactly as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
from aiohttp import web

from bot.config import Config, load_config
from bot.runtime import Runtime
from bot.sandbox.demo import PLATFORM_SCHEMA, health_app, seed_cluster, seed_incident
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.servers import postgres_server, redis_server
from bot.sandbox.slack_api import FakeSlack
from bot.settings import Settings

DEFAULT_CONFIG = "policies/examples/nova-rms.yaml"
DEMO_NAMES = {"U0ALICE": "alice", "U0BOTH": "bo", "U0CAROL": "carol", "U0DAN": "dan", "U0EVE": "eve"}


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _ensure_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    return _with_db(admin_url, name)


def people(config: Config) -> dict[str, str]:
    """Everyone the policy names, as the playground's user picker shows them: `alice (engineer)`."""
    users: dict[str, list[str]] = {}
    for role, spec in config.roles.items():
        for user in spec.users:
            users.setdefault(user, []).append(role)
    return {u: f"{DEMO_NAMES.get(u, u)} ({', '.join(roles)})" for u, roles in users.items()}


async def run(*, config_path: str, host: str, port: int, data_dir: Path,
              ready: Callable[[str], None] | None = None, stop: asyncio.Event | None = None) -> None:
    os.makedirs(data_dir, exist_ok=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(postgres_server(str(data_dir / "postgres"), env_var="DATABASE_URL"))
        redis_url = stack.enter_context(redis_server(str(data_dir / "redis"), env_var="REDIS_URL"))
        state_url = admin if os.environ.get("DATABASE_URL") else _ensure_database(admin, "opsbot")
        platform_url = _ensure_database(admin, "opsbot_demo_platform")
        with psycopg.connect(platform_url, autocommit=True) as conn:
            conn.execute(PLATFORM_SCHEMA)
        kube = stack.enter_context(KubeApiServer())
        cluster_file = data_dir / "cluster.json"
        if cluster_file.exists():  # the sandbox cluster as the last run left it (revisions, replicas)
            kube.cluster.restore(json.loads(cluster_file.read_text()))
        else:
            seed_cluster(kube.cluster)
            seed_incident(kube.cluster)
        kubeconfig = kube.kubeconfig(str(data_dir / "kubeconfig"), context="nova-prod", namespace="nova")

        health = web.AppRunner(health_app(), access_log=None)  # the demo platform's /health, /metrics, /healthz, /readyz
        await health.setup()
        health_site = web.TCPSite(health, "127.0.0.1", 0)
        await health_site.start()
        health_url = f"http://127.0.0.1:{health_site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        env = {**os.environ, "NOVA_DATABASE_URL": platform_url, "NOVA_REDIS_URL": redis_url,
               "DEV_DATABASE_URL": platform_url, "DEV_REDIS_URL": redis_url,
               "NOVA_API_URL": health_url, "NOVA_WORKER_URL": health_url}
        config = load_config(config_path, env=env)
        incident = config.slack.allowed_channels[0] if config.slack.allowed_channels else "C0INCIDENT"
        audit = config.slack.audit_channel or "C0AUDIT"
        if not config.slack.audit_channel:
            config = config.model_copy(update={"slack": config.slack.model_copy(update={"audit_channel": audit})})
        signing_secret, token = secrets.token_hex(16), "xoxb-playground-" + secrets.token_hex(8)
        slack = FakeSlack(signing_secret=signing_secret, users=people(config), token=token,
                          channels={incident: "incident", audit: "ops-audit"})
        await slack.start(host=host, port=port)
        slack.permalink_base = f"http://{host}:{slack.port}"
        settings = Settings(slack_bot_token=token, slack_signing_secret=signing_secret, slack_app_token=None,
                            slack_api_url=slack.api_url, database_url=state_url, redis_url=redis_url, config_path=config_path,
                            kubeconfig=kubeconfig, host="127.0.0.1", port=0, worker_id="dev", queue_prefix="bull",
                            spool_dir=str(data_dir / "spool"))
        runtime = Runtime.build(settings, config)
        await runtime.store.open()
        await runtime.store.migrate()
        await runtime.start(with_worker=True)
        runner = web.AppRunner(runtime.web_app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        bot_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        slack.bot_events_url = f"http://127.0.0.1:{bot_port}/slack/events"
        url = f"http://{host}:{slack.port}/"
        try:
            if ready:
                ready(url)
            await stop.wait()
        finally:
            await runtime.stop()
            await runner.cleanup()
            await health.cleanup()
            await slack.stop()
            cluster_file.write_text(json.dumps(kube.cluster.snapshot()))


def banner(url: str, config_path: str) -> str:
    return (f"\nopsbot playground: {url}   (config: {config_path}; Ctrl-C stops everything)\n"
            "  1. as alice (engineer), type   /ops scale worker 6\n"
            "  2. switch to carol (approver) and click Approve on the card\n"
            "  3. switch to eve (auditor): read #ops-audit, or type /ops audit\n")


def main(config: str | None, host: str, port: int, data_dir: str) -> int:
    import logging

    config_path = config or DEFAULT_CONFIG
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    def ready(url: str) -> None:
        print(banner(url, config_path), flush=True)

    try:
        asyncio.run(run(config_path=config_path, host=host, port=port, data_dir=Path(data_dir).resolve(), ready=ready))
    except KeyboardInterrupt:
        pass
    print("opsbot dev: stopped", file=sys.stderr)
    return 0


__all__ = ["main", "people", "run"]
