"""The `opsbot` console command: serve, worker, migrate, policy check."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from bot.config import config_warnings, load_config
from bot.errors import ConfigError, OpsbotError
from bot.memory import return_freed_memory
from bot.messages import plural
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
    slack_line = ""
    if config.usergroups:  # do the user groups the policy names exist? Only Slack can say (optional)
        from slack_sdk.web.async_client import AsyncWebClient

        from bot.adapters.directory import check_groups, slack_fetch
        from bot.errors import BackendUnavailable

        groups = plural(len(config.usergroups), "user group")
        token = os.environ.get("SLACK_BOT_TOKEN")
        if not token:
            slack_line = (f"slack: the {groups} the policy names were not checked against Slack (SLACK_BOT_TOKEN is not set; "
                          "set it, and SLACK_API_URL for a fake Slack, to check that they exist)")
        else:
            api_url = os.environ.get("SLACK_API_URL") or "https://slack.com/api/"
            client = AsyncWebClient(token=token, base_url=api_url if api_url.endswith("/") else api_url + "/")
            try:
                problems = asyncio.run(check_groups(slack_fetch(client), config.usergroups))
            except BackendUnavailable as exc:
                warnings.append(f"slack: the {groups} the policy names could not be checked: {exc}")
            else:
                for group, error in sorted(problems.items()):
                    where = ", ".join(f"roles.{r}.usergroups" for r, role in config.roles.items() if group in role.usergroups)
                    why = {"no_such_subteam": "does not exist in this Slack workspace",
                           "missing_scope": "cannot be read: the bot token lacks the usergroups:read scope",
                           "plan_upgrade_required": "cannot be used: this workspace's Slack plan has no user groups"}.get(
                               error, f"cannot be used ({error})")
                    warnings.append(f"{where}: Slack user group {group} {why} (usergroups.users.list: {error}); "
                                    "nobody gets a role from it")
                found = len(config.usergroups) - len(problems)
                slack_line = (f"slack: the {groups} the policy names exist in Slack" if not problems else
                              f"slack: {found} of the {groups} the policy names can be used")
    for w in warnings:
        print(f"warning: {path}: {w}")
    if slack_line:
        print(slack_line)
    counted = f", {plural(len(warnings), 'warning')}" if warnings else ""
    print(f"{path}: OK ({plural(len(config.rules), 'rule')}, {plural(len(config.roles), 'role')}, "
          f"{plural(len(config.deployments), 'deployment')}"
          + (f", {plural(len(config.actions), 'action')} ({', '.join(config.actions)})" if config.actions else "") + f"{counted})")
    return 0


async def _explain(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from bot.adapters.http_probe import HttpProbeAdapter
    from bot.adapters.kube import KubeAdapter
    from bot.adapters.platform_db import PlatformDbAdapter
    from bot.adapters.queues import QueueAdapter
    from bot.adapters.redis_pools import RedisPools
    from bot.adapters.redis_targets import RedisTargetAdapter
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
        located = command(inv.command, config).locate(inv.params, config)
        if located is not None:
            subject = located
            plan_line = (f"not read (--no-plan): {located.target_label} [{located.environment}]; conditions on the change "
                         "(replicas, revisions back) are taken as not holding")
    else:
        pools = RedisPools()
        queues = QueueAdapter(pools)
        kube = KubeAdapter(config, kubeconfig=os.environ.get("KUBECONFIG"))
        probes = HttpProbeAdapter()
        try:
            ctx = Context(config=config, kube=kube, databases=PlatformDbAdapter(config), queues=queues,
                          redis=RedisTargetAdapter(config, pools), http=probes)
            plan = await command(inv.command, config).plan(inv.params, ctx)
            subject, plan_line = plan, f"{plan.summary} [{plan.environment}]"
        except OpsbotError as exc:
            plan_line = f"cannot be computed: {exc} (deciding on the command alone)"
        finally:
            kube.close()
            await queues.close()
            await probes.close()
            await pools.close()
    d = decide(subject, actor, config, channel_id=args.channel, now=now, break_glass=bool(inv.flags.break_glass))
    roles = ", ".join(sorted(config.roles_of(actor.user_id, actor.groups))) or "none"
    need = ""
    if d.approvals_required:
        need = f" — {plural(d.approvals_required, 'approval')} from {', '.join(d.approver_roles)}"
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


def _database_url(*, owner: bool = False) -> str:
    """opsbot's own database. ``owner``: for `opsbot migrate`, which needs the role that owns the
    tables; DATABASE_OWNER_URL when set (so the bot itself can run with the app role's
    DATABASE_URL), else DATABASE_URL."""
    url = (os.environ.get("DATABASE_OWNER_URL") if owner else None) or os.environ.get("DATABASE_URL")
    if not url:
        raise ConfigError("DATABASE_URL is not set (opsbot's own database)" if not owner else
                          "neither DATABASE_OWNER_URL nor DATABASE_URL is set (opsbot's own database, as its owner)")
    return url


async def _migrate(url: str, app_role: str | None) -> list[str]:
    from bot.adapters.store import Store

    store = Store(url, min_size=1, max_size=1)
    await store.open()
    try:
        applied = await store.migrate()
        if app_role:
            await store.grant_app_role(app_role)
        return applied
    finally:
        await store.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    applied = asyncio.run(_migrate(_database_url(owner=True), args.app_role))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    if args.app_role:
        print(f"granted {args.app_role}: requests read/write; audit trail SELECT and INSERT only")
    return 0


async def _audit(args: argparse.Namespace) -> int:
    # Streamed end to end (issue 13): verify and export hold one batch of rows at a time, whatever the size of the trail.
    from bot.adapters.audit_log import AuditLog, export_csv, export_jsonl, verify_lines
    from bot.adapters.store import Store
    from bot.config import parse_since

    if args.audit_cmd == "verify" and args.file:
        checked = await _verify_timeline(args.file)
        if checked is not None:
            return checked
        with open(args.file, "rb") as fh:  # bytes: export lines are checked without decoding them
            report, anchor = verify_lines(fh)
        print(f"{args.file}: {report.summary()}")
        if report.ok and report.first_seq is not None:
            print(f"anchored at prev_hash {anchor} (compare with row {report.first_seq - 1} in the database or channel)")
        return 0 if report.ok else 1
    store = Store(_database_url(), min_size=1, max_size=2)
    await store.open()
    log = AuditLog(store)
    try:
        if args.audit_cmd == "verify":
            resume = _verify_state(args.incremental) if args.incremental else None
            report = await log.verify(resume=resume)
            if resume is not None and report.resumed_after is None and report.ok:
                print(f"(row {resume[0]}, verified last time, was pruned since: verified from the latest checkpoint)")
            print(f"database: {report.summary()}")
            ok = report.ok
            if ok and args.incremental and report.last_seq is not None and report.last_hash is not None:
                _save_verify_state(args.incremental, report.last_seq, report.last_hash)
            if args.against_channel:
                ok = await _verify_channel(log) and ok
            return 0 if ok else 1
        if args.audit_cmd == "export":
            since = parse_since(args.since) if args.since else None
            until = parse_since(args.until) if args.until else None
            out = open(args.output, "w", newline="") if args.output else sys.stdout
            try:
                export = export_jsonl if args.format == "jsonl" else export_csv
                n = await export(log, out, since=since, until=until)
            finally:
                if args.output:
                    out.close()
            print(f"exported {plural(n, 'row')}", file=sys.stderr)
            return 0
        if args.audit_cmd == "timeline":
            return await _timeline(log, args)
        if args.audit_cmd == "prune":
            cp = await log.prune(parse_since(args.before))
            if cp is None:
                print("nothing to prune")
            else:
                print(f"pruned {plural(cp['rows_pruned'], 'row')} up to seq {cp['upto_seq']}; checkpoint {cp['hash']} keeps the chain "
                      f"verifiable from seq {cp['upto_seq'] + 1}")
            return 0
    finally:
        await store.close()
    return 2


def _verify_state(path: str) -> tuple[int, str] | None:
    """The (seq, hash) an incremental verify (``--incremental FILE``) ended at last time, or None
    when FILE does not exist yet (the first run walks the whole chain)."""
    import json
    import re

    try:
        with open(path, "rb") as fh:
            raw = fh.read(4097)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if len(raw) > 4096:
            raise ValueError("too long")
        state = json.loads(raw)
        seq, digest = state["seq"], state["hash"]
        if type(seq) is not int or seq < 0 or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("seq must be a number, hash 64 hex digits")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not an opsbot verify state ({exc}): delete it to verify the whole chain again") from exc
    return seq, digest


def _save_verify_state(path: str, seq: int, digest: str) -> None:
    """Where this verify ended, for the next ``--incremental`` run (written whole, then renamed)."""
    import json
    import os
    from datetime import UTC, datetime

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"seq": seq, "hash": digest, "verified_at": datetime.now(UTC).isoformat(timespec="seconds")}, fh)
        fh.write("\n")
    os.replace(tmp, path)
    print(f"saved: seq {seq}, hash {digest} → {path} (the next --incremental run starts after it)")


async def _timeline(log: object, args: argparse.Namespace) -> int:
    """`opsbot audit timeline` (bot/timeline.py): every channel unless --channel names one."""
    from datetime import UTC, datetime

    from bot import timeline
    from bot.adapters.audit_log import AuditLog
    from bot.config import parse_since

    assert isinstance(log, AuditLog)
    now = datetime.now(UTC)
    try:
        since, until = parse_since(args.since, now), parse_since(args.until, now) if args.until else now
        channel = timeline.channel_of(args.channel)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if since >= until:
        raise ConfigError("--since must be before --until")
    tl = await timeline.collect(log, channel=channel, since=since, until=until, now=now)
    text = timeline.markdown(tl) if args.format == "md" else timeline.as_json(tl)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    more = f"; cut at {timeline.MAX_ENTRIES}: the rest starts at --since {timeline.continue_hint(tl)}" if tl.truncated else ""
    print(f"timeline: {plural(len(tl.entries), 'entry')} (seq {tl.seqs}){more}", file=sys.stderr)
    return 0


def _read_timeline(path: str) -> object:
    """The timeline at ``path`` checked on its own (bot/timeline.py ``verify_text``, a FileCheck), or None: not a timeline."""
    from bot import timeline

    if os.path.getsize(path) > timeline.MAX_FILE_BYTES:  # larger than any timeline: an export, streamed by the caller
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        return timeline.verify_text(fh.read())


async def _verify_timeline(path: str) -> int | None:
    """`verify --file` on a timeline (Markdown or JSON; None: not a timeline, e.g. an export):
    each entry on its own, then, when DATABASE_URL is set and answers, each (seq, hash) against the trail."""
    from bot import timeline
    from bot.adapters.audit_log import AuditLog
    from bot.adapters.store import Store

    check = _read_timeline(path)
    if not isinstance(check, timeline.FileCheck):
        return None
    seqs = [seq for seq, _ in check.hashes]
    span = f"seq {seqs[0]}..{seqs[-1]}" if seqs else "no rows"
    if not check.ok:
        print(f"{path}: BROKEN: " + "; ".join(check.problems[:20]) + (" …" if len(check.problems) > 20 else ""))
        return 1
    print(f"{path}: OK: {plural(len(seqs), 'timeline entry')} ({span}), each line matches its audit row and each row its hash")
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("database: not checked (DATABASE_URL is not set): the file is consistent, but only the trail proves its rows are the trail's")
        return 0
    store = Store(url, min_size=1, max_size=1)
    try:
        await store.open()
        log = AuditLog(store)
        stored = await log.hashes_of(seqs)
        cp = await log.latest_checkpoint()
    except OpsbotError as exc:
        print(f"database: not checked ({exc})")
        return 0
    finally:
        await store.close()
    pruned = int(cp["upto_seq"]) if cp else 0
    wrong = [f"seq {seq}: the trail's hash is {stored[seq][:16]}…, the file's {digest[:16]}…" for seq, digest in check.hashes
             if seq in stored and stored[seq] != digest]
    missing = [seq for seq, _ in check.hashes if seq not in stored and seq > pruned]
    gone = [seq for seq, _ in check.hashes if seq not in stored and seq <= pruned]
    if wrong or missing:
        print("database: BROKEN: " + "; ".join(wrong + [f"seq {seq} is not in the audit trail" for seq in missing][:20]))
        return 1
    print(f"database: OK: {plural(len(seqs) - len(gone), 'entry')} match the audit trail's own (seq, hash)"
          + (f"; {plural(len(gone), 'entry')} pruned from the trail since (up to seq {pruned}), not compared" if gone else ""))
    return 0


async def _verify_channel(log: object) -> bool:
    """Compare the hashes posted in the audit channel with the database."""
    from collections import Counter
    from typing import Any

    from slack_sdk.errors import SlackApiError
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.adapters.audit_log import AuditLog, stored_hashes
    from bot.messages import posted_hashes

    assert isinstance(log, AuditLog)
    settings = Settings.from_env()
    config = load_config(os.environ.get("OPSBOT_CONFIG", "policies/default.yaml"))
    channel = config.slack.audit_channel
    if not channel:
        print("channel: slack.audit_channel is not set; nothing to compare")
        return False
    client = AsyncWebClient(token=settings.slack_bot_token, base_url=settings.slack_api_url)
    # Only what opsbot itself posted is evidence: anyone in the channel can post a `#N … hash …` line.
    try:
        me = await client.auth_test()
    except SlackApiError as exc:
        print(f"channel: cannot tell opsbot's own messages from others (auth.test: {exc.response.get('error', exc)}); "
              "nothing compared")
        return False
    bot_user, bot_id = me.get("user_id"), me.get("bot_id")

    def ours(message: dict[str, Any]) -> bool:
        user, bid = message.get("user"), message.get("bot_id")
        return bool(user or bid) and (not user or user == bot_user) and (not bid or bid == bot_id)

    posted: dict[int, str] = {}  # seq → its hash as posted: whole, or its first HASH_PREFIX digits
    ignored: Counter[str] = Counter()

    def read(message: dict[str, Any]) -> None:
        # Whole lines, as bot/messages.py writes them (posted_hashes): an audit line (`#N` … · hash
        # `…`), a request's rows in one line under a backlog, a headline's "last record `#N` hash `…`".
        found = [pair for line in str(message.get("text", "")).splitlines() for pair in posted_hashes(line)]
        if found and not ours(message):
            ignored[str(message.get("user") or message.get("bot_id") or "unknown")] += 1
            return
        for seq, digest in found:
            if len(digest) >= len(posted.get(seq, "")):  # a headline's whole hash says more than a prefix
                posted[seq] = digest

    cursor = None
    while True:
        resp = await client.conversations_history(channel=channel, limit=200, cursor=cursor)
        for message in resp.get("messages") or []:
            read(message)
            if ours(message) and (message.get("reply_count") or message.get("thread_ts") == message.get("ts")
                                  or "last record" in str(message.get("text", ""))):
                replies = await client.conversations_replies(channel=channel, ts=message["ts"], limit=1000)
                for reply in replies.get("messages") or []:
                    if reply.get("ts") != message["ts"]:
                        read(reply)
        cursor = (resp.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            break
    if ignored:
        who = ", ".join(f"{poster} ({n})" for poster, n in ignored.most_common(10))
        print(f"channel: ignored {plural(sum(ignored.values()), 'message')} with audit lines not posted by opsbot ({bot_user}): from {who}")
    # The database's hashes streamed past what the channel showed: memory grows with the channel, not the table.
    bad: list[int] = []
    present: set[int] = set()
    unposted = 0
    async for seq, digest in stored_hashes(log):
        if seq in posted:
            present.add(seq)
            if not digest.startswith(posted[seq]):
                bad.append(seq)
        else:
            unposted += 1
    checkpoint = await log.latest_checkpoint()
    pruned_upto = int(checkpoint["upto_seq"]) if checkpoint else 0
    if checkpoint and not str(checkpoint["last_hash"]).startswith(posted.get(pruned_upto, checkpoint["last_hash"])):
        bad = sorted({*bad, pruned_upto})  # the checkpoint claims a last hash the channel never showed
    gone = sorted(seq for seq in posted if seq not in present)
    pruned = [seq for seq in gone if seq <= pruned_upto]
    missing = [seq for seq in gone if seq > pruned_upto]  # deleted: the chain in the database was cut
    if bad:
        print(f"channel: BROKEN: the database differs from what was posted at seq {_seqs(bad)}")
    if missing:
        are = "is" if len(missing) == 1 else "are"
        print(f"channel: MISSING: {plural(len(missing), 'posted row')} {are} not in the database and no pruning checkpoint covers "
              f"them: seq {_seqs(missing)}")
    if pruned:
        print(f"channel: {plural(len(pruned), 'posted row')} pruned (covered by the checkpoint up to seq {pruned_upto})")
    print(f"channel: {plural(len(posted), 'posted hash')} compared, {len(bad)} differ, {len(missing)} missing; "
          f"{plural(unposted, 'row')} not (yet) posted")
    return not bad and not missing


def _seqs(seqs: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, seqs[:limit]))
    return shown + (f" … ({len(seqs) - limit} more, up to {seqs[-1]})" if len(seqs) > limit else "")


def cmd_audit(args: argparse.Namespace) -> int:
    return asyncio.run(_audit(args))


async def _serve(settings: Settings, config_path: str, *, http: bool, worker: bool) -> None:
    from aiohttp import web  # here, not at the top: `opsbot audit …` starts without loading aiohttp

    from bot.runtime import Runtime

    config = load_config(config_path)
    for w in config_warnings(config):
        log.warning("%s: %s", config_path, w)
    runtime = Runtime.build(settings, config)
    await runtime.store.open()
    try:
        # Read-only when up to date, so the least-privilege app role can start; it never migrates.
        applied = await runtime.store.ensure_migrated()
    except BaseException:
        await runtime.store.close()
        raise
    if applied:
        log.info("applied migration(s) %s", ", ".join(applied))
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
                socket_handler = runtime.socket_mode_handler(settings.slack_app_token)  # with the busy fast path
                await socket_handler.connect_async()
                log.info("connected to Slack in Socket Mode")
        else:  # `opsbot worker`: no Slack endpoint, but health, readiness and metrics for Kubernetes and Prometheus
            runner = web.AppRunner(runtime.web_app(slack=False))
            await runner.setup()
            await web.TCPSite(runner, settings.host, settings.port).start()
            log.info("worker health on http://%s:%s (/healthz, /readyz, /metrics)", settings.host, settings.port)
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
    return_freed_memory()
    asyncio.run(_serve(Settings.from_env(), _config_path(args), http=True, worker=not args.no_worker))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    return_freed_memory()
    asyncio.run(_serve(Settings.from_env(), _config_path(args), http=False, worker=True))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from bot.sandbox import dev

    if args.what == "env":
        return dev.print_env(args.data_dir)
    return dev.main(args.config, args.host, args.port, args.data_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsbot", description="ChatOps for production: /ops in Slack, with policy, approvals and audit.")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the Slack app (HTTP on $PORT, Socket Mode when SLACK_APP_TOKEN is set) and the worker")
    serve.add_argument("--config", help="config file (default $OPSBOT_CONFIG or policies/default.yaml)")
    serve.add_argument("--no-worker", action="store_true", help="do not run the action worker in this process")
    serve.set_defaults(fn=cmd_serve)
    devp = sub.add_parser("dev", help="the local playground: the real bot with a Slack emulator in your browser, a sandbox "
                                      "cluster, PostgreSQL and Redis; no Slack workspace or cluster needed")
    devp.add_argument("what", nargs="?", choices=["env"],
                      help="env: print the running dev world's environment (DATABASE_URL, KUBECONFIG, SLACK_*, …) as "
                           "`export` lines, for `eval \"$(opsbot dev env)\"` before `opsbot audit …` or `opsbot policy explain`")
    devp.add_argument("--config", help=f"your policy to try against the sandbox (default {'policies/examples/nova-rms.yaml'})")
    devp.add_argument("--port", type=int, default=int(os.environ.get("OPSBOT_DEV_PORT", "8800")), help="playground port (default 8800)")
    devp.add_argument("--host", default="127.0.0.1")
    devp.add_argument("--data-dir", default=".opsbot/dev", help="where the private PostgreSQL and Redis keep their data")
    devp.set_defaults(fn=cmd_dev)
    worker = sub.add_parser("worker", help="run only the action worker")
    worker.add_argument("--config")
    worker.set_defaults(fn=cmd_worker)
    migrate = sub.add_parser("migrate", help="create or upgrade opsbot's tables, as their owner ($DATABASE_OWNER_URL, "
                                             "else $DATABASE_URL)")
    migrate.add_argument("--app-role", help="grant this database role what the bot needs (no UPDATE/DELETE on the audit trail)")
    migrate.set_defaults(fn=cmd_migrate)
    audit = sub.add_parser("audit", help="the audit trail: verify, export, prune")
    asub = audit.add_subparsers(dest="audit_cmd", required=True)
    verify = asub.add_parser("verify", help="walk the hash chain; exit 1 at the first broken link")
    verify.add_argument("--file", help="verify an export (JSON lines) or a timeline (.md/.json) on its own instead of the database")
    verify.add_argument("--against-channel", action="store_true", help="also compare with the hashes posted in the audit channel")
    verify.add_argument("--incremental", metavar="FILE",
                        help="walk only the rows after the one FILE says the last verify ended at (checking that row is "
                             "unchanged), then save where this one ended; without FILE yet, the whole chain. Keep FILE away "
                             "from the database's owners: it is what the next run trusts")
    verify.set_defaults(fn=cmd_audit)
    export = asub.add_parser("export", help="rows with their hashes, for evidence requests")
    export.add_argument("--since", help="7d, 12h, or an ISO date/time (UTC)")
    export.add_argument("--until", help="same forms; exclusive")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--output", "-o", help="file to write (default standard output)")
    export.set_defaults(fn=cmd_audit)
    tline = asub.add_parser("timeline", help="what opsbot did or refused in a window (and channel), verifiable (bot/timeline.py)")
    tline.add_argument("--since", default="2h", help="2h, 7d, or an ISO date/time (UTC); default 2h")
    tline.add_argument("--until", help="same forms; exclusive; default now")
    tline.add_argument("--channel", default="all", help="a channel id (C0123ABCD) or `all` (default)")
    tline.add_argument("--format", choices=["md", "json"], default="md")
    tline.add_argument("--output", "-o", help="file to write (default standard output)")
    tline.set_defaults(fn=cmd_audit)
    prune = asub.add_parser("prune", help="delete old rows, keeping a chained checkpoint so the rest still verifies")
    prune.add_argument("--before", required=True, help="e.g. 400d or 2025-01-01")
    prune.set_defaults(fn=cmd_audit)
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
        code = int(args.fn(args))
        sys.stdout.flush()  # here, where a closed pipe is caught below, rather than at interpreter exit
        return code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OpsbotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`opsbot audit export | head`): stop quietly, as coreutils do. Whatever
        # is still buffered for stdout goes nowhere, so that the interpreter's last flush does not fail.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
