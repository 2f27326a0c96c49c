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
    missing: list[str] = []
    try:
        config = load_config(path, missing_env=missing)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    warnings = missing + config_warnings(config)
    for w in warnings:
        print(f"warning: {path}: {w}")
    print(f"{path}: OK ({len(config.rules)} rules, {len(config.roles)} roles, {len(config.deployments)} deployments"
          f"{f', {len(warnings)} warning(s)' if warnings else ''})")
    return 0


async def _explain(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from bot.adapters.kube import KubeAdapter
    from bot.adapters.platform_db import PlatformDbAdapter
    from bot.adapters.queues import QueueAdapter
    from bot.domain import Actor, Plan, UserId
    from bot.errors import UserError
    from bot.policy.engine import decide
    from bot.ports import Context
    from commands.registry import command, parse

    path = _config_path(args)
    missing: list[str] = []
    config = load_config(path, missing_env=missing if args.no_plan else None)
    actor = Actor(UserId(args.as_user), groups=frozenset(args.group or ()))
    now = datetime.fromisoformat(args.at).astimezone(UTC) if args.at else datetime.now(UTC)
    try:
        inv = parse(args.text.removeprefix("/ops").strip(), config)
    except UserError as exc:
        print(f"command:  {args.text}\ninvalid:  {exc}")
        return 2
    subject: Plan | str = inv.command
    plan_line = "not computed (--no-plan)"
    if inv.command in ("help", "pending", "cancel"):
        plan_line = "none (a meta command)"
    elif args.no_plan:
        located = command(inv.command).locate(inv.params, config)
        if located is not None:
            subject = located
            plan_line = (f"not read (--no-plan): {located.target_label} [{located.environment}]; conditions on the change "
                         "(replicas, revisions back) are taken as not holding")
    else:
        queues = QueueAdapter()
        kube = KubeAdapter(config, kubeconfig=os.environ.get("KUBECONFIG"))
        try:
            plan = await command(inv.command).plan(inv.params, Context(config=config, kube=kube, databases=PlatformDbAdapter(config),
                                                                        queues=queues))
            subject, plan_line = plan, f"{plan.summary} [{plan.environment}]"
        except OpsbotError as exc:
            plan_line = f"cannot be computed: {exc} (deciding on the command alone)"
        finally:
            kube.close()
            await queues.close()
    d = decide(subject, actor, config, channel_id=args.channel, now=now, break_glass=bool(inv.flags.break_glass))
    roles = ", ".join(sorted(config.roles_of(actor.user_id, actor.groups))) or "none"
    need = ""
    if d.approvals_required:
        need = f" — {d.approvals_required} approval(s) from {', '.join(d.approver_roles)}"
        if d.approvals_each:
            need += f", at least one from each of {', '.join(d.approvals_each)}"
    print(f"command:  {inv.text}")
    where = f", channel {args.channel}" if args.channel else ""
    print(f"actor:    {actor.user_id} (roles: {roles}){where}, at {now:%Y-%m-%d %H:%M} UTC")
    print(f"plan:     {plan_line}")
    print(f"decision: {d.kind.value.upper().replace('_', ' ')}{need}")
    print(f"rule:     {d.rule or '(none matched)'}")
    print(f"why:      {d.reason}")
    print("trace:")
    for line in d.trace:
        print(f"  {line}")
    return 3 if not d.allowed else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    return asyncio.run(_explain(args))


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
    explain = psub.add_parser("explain", help="the decision for one command by one person, and the rule that made it",
                              description="Exit code: 0 allowed (with or without approval), 3 denied, 2 invalid command.")
    explain.add_argument("--as", dest="as_user", required=True, metavar="SLACK_USER_ID")
    explain.add_argument("text", help='the command as typed, e.g. "scale worker 6"')
    explain.add_argument("--config")
    explain.add_argument("--no-plan", action="store_true", help="do not read the target (no cluster or database access)")
    explain.add_argument("--channel", help="the channel it is typed in (for channel allowlists)")
    explain.add_argument("--group", action="append", metavar="USERGROUP_ID", help="a Slack user group the person is in (repeatable)")
    explain.add_argument("--at", help="the time to decide at, ISO 8601 (default now), for change windows")
    explain.set_defaults(fn=cmd_policy_explain)
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
