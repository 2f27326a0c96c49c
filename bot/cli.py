"""The `opsbot` console command: serve, worker, migrate, policy check."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from aiohttp import web

from bot.config import config_warnings, load_config
from bot.errors import ConfigError, OpsbotError
from bot.settings import Settings

log = logging.getLogger("opsbot")


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("OPSBOT_CONFIG") or "policies/default.yaml")


def cmd_policy_check(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    warnings = config_warnings(config)
    for w in warnings:
        print(f"warning: {path}: {w}")
    print(f"{path}: OK ({len(config.rules)} rules, {len(config.roles)} roles, {len(config.deployments)} deployments"
          f"{f', {len(warnings)} warning(s)' if warnings else ''})")
    return 0


async def _migrate(settings: Settings) -> list[str]:
    from bot.adapters.store import Store

    store = Store(settings.database_url, min_size=1, max_size=1)
    await store.open()
    try:
        return await store.migrate()
    finally:
        await store.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    applied = asyncio.run(_migrate(Settings.from_env()))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


async def _serve(settings: Settings, config_path: str, *, http: bool, worker: bool) -> None:
    from bot.runtime import Runtime

    config = load_config(config_path)
    for w in config_warnings(config):
        log.warning("%s: %s", config_path, w)
    runtime = Runtime.build(settings, config)
    await runtime.store.open()
    await runtime.store.migrate()
    await runtime.start(with_worker=worker)
    runner: web.AppRunner | None = None
    socket_handler = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if http:
            runner = web.AppRunner(runtime.web_app())
            await runner.setup()
            await web.TCPSite(runner, settings.host, settings.port).start()
            log.info("listening on http://%s:%s (POST /slack/events, /healthz, /readyz, /metrics)", settings.host, settings.port)
            if settings.slack_app_token:
                from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

                socket_handler = AsyncSocketModeHandler(runtime.bolt, settings.slack_app_token)
                await socket_handler.connect_async()
                log.info("connected to Slack in Socket Mode")
        if worker:
            log.info("worker %s consuming %s", settings.worker_id, settings.actions_queue)
        await stop.wait()
    finally:
        if socket_handler is not None:
            await socket_handler.close_async()
        if runner is not None:
            await runner.cleanup()
        await runtime.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    asyncio.run(_serve(Settings.from_env(), _config_path(args), http=True, worker=not args.no_worker))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    asyncio.run(_serve(Settings.from_env(), _config_path(args), http=False, worker=True))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsbot", description="ChatOps for production: /ops in Slack, with policy, approvals and audit.")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the Slack app (HTTP on $PORT, Socket Mode when SLACK_APP_TOKEN is set) and the worker")
    serve.add_argument("--config", help="config file (default $OPSBOT_CONFIG or policies/default.yaml)")
    serve.add_argument("--no-worker", action="store_true", help="do not run the action worker in this process")
    serve.set_defaults(fn=cmd_serve)
    worker = sub.add_parser("worker", help="run only the action worker")
    worker.add_argument("--config")
    worker.set_defaults(fn=cmd_worker)
    migrate = sub.add_parser("migrate", help="create or upgrade opsbot's tables in $DATABASE_URL")
    migrate.set_defaults(fn=cmd_migrate)
    policy = sub.add_parser("policy", help="policy tools")
    psub = policy.add_subparsers(dest="policy_cmd", required=True)
    check = psub.add_parser("check", help="validate the config and warn about rules that cannot work")
    check.add_argument("--config")
    check.set_defaults(fn=cmd_policy_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OpsbotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
