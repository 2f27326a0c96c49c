"""What people type → which command, with which parameters.

The grammar (kept exactly; it is part of the product):

    /ops help
    /ops status <deployment>
    /ops history <deployment>
    /ops pods <deployment>
    /ops events <deployment>
    /ops logs <deployment> [--since 10m] [--tail 200] [--previous] [--grep TEXT] [--container NAME]
    /ops scale <deployment> <replicas>
    /ops rollback <deployment> [--to-revision N]
    /ops restart <deployment>
    /ops hpa <deployment> [--min N] [--max M]
    /ops backup <cronjob>
    /ops replay webhook <id>
    /ops disable provider <name>
    /ops enable provider <name>
    /ops queue stats <queue>
    /ops queue failed <queue> [--limit 10]
    /ops queue retry <queue> <job-id>
    /ops queue retry-failed <queue> [--limit 10]
    /ops queue pause <queue>
    /ops queue resume <queue>
    /ops queue clean <queue> --failed|--completed --older-than 7d [--limit 1000]
    /ops db sessions <database>
    /ops db queries <database> [--over 30s]
    /ops db cancel <database> <pid>
    /ops db terminate <database> <pid>
    /ops redis info <target>
    /ops redis len <target> <key>
    /ops health [<service>]
    /ops pending                      open requests you may approve
    /ops cancel <request-id>          withdraw your own request before it runs
    /ops undo <request-id> [--reason "…"] [--dry-run]   request the inverse of a request that succeeded (bot/undo.py)
    /ops timeline [--since 2h] [--until <time>] [--channel #incident]   what opsbot did or refused (bot/timeline.py)
    /ops help [<command>]
    /ops <words of an action> <its parameters>    the config's own `actions:` (commands/actions/)

plus ``--reason "…"``, ``--dry-run`` and ``--break-glass "<reason>"`` on any command. Slack clients turn straight quotes into
curly ones on many keyboards; they are normalised before splitting so that
``--reason “db failover”`` means what it says.
"""

from __future__ import annotations

import functools
import re
import shlex
from typing import Any

from bot.config import Config, parse_since
from bot.domain import REQUEST_ID_PATTERN, Flags, Invocation
from bot.errors import UsageError
from bot.untrusted import check_command_text, non_ascii_hint, number_problem, whole_number
from commands.actions.make import actions_of
from commands.base import Command
from commands.db.queries import DbQueries
from commands.db.sessions import DbSessions
from commands.db.signal import DbCancel, DbTerminate
from commands.http.health import Health
from commands.k8s.backup import Backup
from commands.k8s.events import Events
from commands.k8s.history import History
from commands.k8s.hpa import Hpa
from commands.k8s.logs import Logs
from commands.k8s.pods import Pods
from commands.k8s.restart import Restart
from commands.k8s.rollback import Rollback
from commands.k8s.scale import Scale
from commands.k8s.status import Status
from commands.platform.provider import DisableProvider, EnableProvider
from commands.platform.replay import ReplayWebhook
from commands.queues.clean import QueueClean
from commands.queues.failed import QueueFailed
from commands.queues.pause import QueuePause, QueueResume
from commands.queues.retry import QueueRetry, QueueRetryFailed
from commands.queues.stats import QueueStats
from commands.redis.info import RedisInfo
from commands.redis.length import RedisLen

COMMANDS: tuple[Command, ...] = (
    Status(), History(), Pods(), Events(), Logs(),  # read-only looks at a deployment
    Scale(), Rollback(), Restart(), Hpa(), Backup(),  # Kubernetes changes
    ReplayWebhook(), DisableProvider(), EnableProvider(),  # the platform's own data
    QueueStats(), QueueFailed(),  # read-only looks at a BullMQ queue
    QueueRetry(), QueueRetryFailed(), QueuePause(), QueueResume(), QueueClean(),  # BullMQ changes
    DbSessions(), DbQueries(), DbCancel(), DbTerminate(),  # a platform database's sessions (pg_stat_activity)
    RedisInfo(), RedisLen(), Health(),  # read-only looks at a platform's Redis and HTTP health endpoints
)
BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
COMMON_FLAGS = {"--reason": str, "--dry-run": bool, "--break-glass": str}
_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "«": '"', "»": '"'})
HELP_USAGE = "/ops help"
META_USAGE = {"pending": "/ops pending", "cancel": "/ops cancel <request-id>", "help": "/ops help [<command>]",
              "audit": "/ops audit [--user @x] [--command scale] [--target worker] [--since 7d] [--outcome failed] "
                       "[--before #N | --page N]",
              "timeline": "/ops timeline [--since 2h] [--until <time>] [--channel #incident]"}
AUDIT_FLAGS = {"--user": str, "--command": str, "--target": str, "--since": str, "--outcome": str, "--page": int, "--before": int}
UNDO_USAGE = '/ops undo <request-id> [--reason "…"] [--dry-run]'
MAX_AUDIT_PAGE = 1_000_000
MAX_AUDIT_SEQ = 2**63 - 1  # audit seq is a PostgreSQL bigint
_SEQ = re.compile(r"#?[0-9]{1,19}")  # `--before 1234` or `--before #1234`, as the rows are shown
_MENTION = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$")


def commands_of(config: Config | None) -> tuple[Command, ...]:
    """The built-ins and, after them, the config's actions."""
    return COMMANDS + (actions_of(config) if config is not None else ())


def _parse_audit(tokens: list[str], text: str, config: Config) -> Invocation:
    """`/ops audit` filters. Users may be mentions (<@U123|alice>, as Slack escapes them), ids or @names."""
    params: dict[str, Any] = {"page": 1}
    seen: set[str] = set()
    i = 0
    while i < len(tokens):
        name, eq, inline = tokens[i].partition("=")
        if name not in AUDIT_FLAGS:
            raise UsageError(f"unknown audit filter `{tokens[i]}`.", usage=META_USAGE["audit"])
        if name in seen:
            raise UsageError(f"`{name}` is given twice; give each filter once.", usage=META_USAGE["audit"])
        seen.add(name)
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(tokens):
            value, i = tokens[i + 1], i + 2
        else:
            raise UsageError(f"`{name}` needs a value.", usage=META_USAGE["audit"])
        key = name[2:]
        if name == "--before":
            before = int(value.removeprefix("#")) if _SEQ.fullmatch(value) else None
            if before is None or not 1 <= before <= MAX_AUDIT_SEQ:
                problem = number_problem(value, "`--before`") if before is None or before > MAX_AUDIT_SEQ \
                    else f"`--before` takes an audit row number (the `#N` of a row shown), 1 or more; got `{value}`."
                raise UsageError(problem, usage=META_USAGE["audit"])
            params["before"] = before
            continue
        if AUDIT_FLAGS[name] is int:
            page = whole_number(value)
            if page is None or page < 1 or page > MAX_AUDIT_PAGE:
                problem = number_problem(value, f"`{name}`") if page is None else f"`{name}` takes 1 to {MAX_AUDIT_PAGE:,}, got `{value}`."
                raise UsageError(problem, usage=META_USAGE["audit"])
            params[key] = page
            continue
        if key == "user":
            m = _MENTION.match(value)
            params["user"] = m.group(1) if m else value
        elif key == "since":
            try:
                parse_since(value)
            except ValueError as exc:
                raise UsageError(str(exc), usage=META_USAGE["audit"]) from None
            params["since"] = value
        elif key == "command" and value not in BY_NAME and value not in config.actions and value not in META_USAGE:
            names = [*BY_NAME, *config.actions]
            raise UsageError(f"no command `{value[:100]}`; use one of {', '.join(names)}.", usage=META_USAGE["audit"])
        else:
            params[key] = value
    if "--page" in seen and "--before" in seen:
        raise UsageError("give `--before N` (the rows older than `#N`) or `--page N`, not both.", usage=META_USAGE["audit"])
    return Invocation(command="audit", params=params, flags=Flags(), text=text.strip())


def _parse_undo(tokens: list[str], text: str) -> Invocation:
    """`/ops undo <request-id> [--reason "…"] [--dry-run]`: the id is checked here, before anything is read."""
    reason = ""
    dry_run = "--dry-run" in tokens
    tokens = [t for t in tokens if t != "--dry-run"]
    if len(tokens) >= 2 and tokens[-2].partition("=")[0] == "--reason":
        reason, tokens = tokens[-1].strip(), tokens[:-2]
        if not reason:
            raise UsageError('`--reason` needs some text, e.g. `--reason "INC-142 the scale made it worse"`.', usage=UNDO_USAGE)
    elif tokens and tokens[-1].startswith("--reason="):
        reason, tokens = tokens[-1].partition("=")[2].strip(), tokens[:-1]
        if not reason:
            raise UsageError('`--reason` needs some text, e.g. `--reason "INC-142 the scale made it worse"`.', usage=UNDO_USAGE)
    if len(tokens) != 1:
        raise UsageError("`undo` takes one request id, from the card of the request to undo, e.g. `/ops undo r-7kq2m9xa`.",
                         usage=UNDO_USAGE)
    given = tokens[0]
    if not re.fullmatch(REQUEST_ID_PATTERN, given):
        shown = "".join(c if c.isprintable() else "?" for c in given[:40]).replace("`", "'")
        raise UsageError(f"`{shown}`{'…' if len(given) > 40 else ''} is not an opsbot request id{non_ascii_hint(given[:40])}; "
                         "ids look like `r-7kq2m9xa` (on each card, and in `/ops audit`).", usage=UNDO_USAGE)
    return Invocation(command="undo", params={"request_id": given}, flags=Flags(reason=reason, dry_run=dry_run), text=text.strip())


def _parse_timeline(tokens: list[str], text: str) -> Invocation:
    """`/ops timeline` (bot/timeline.py): a window (``--since``, default 2h; ``--until``, default
    now) and a channel (``--channel``: a mention or an id; default the channel it is typed in)."""
    from bot.timeline import DEFAULT_SINCE, channel_of

    usage = META_USAGE["timeline"]
    params: dict[str, Any] = {"since": DEFAULT_SINCE, "until": None, "channel": None}
    seen: set[str] = set()
    i = 0
    while i < len(tokens):
        name, eq, inline = tokens[i].partition("=")
        if name not in ("--since", "--until", "--channel"):
            raise UsageError(f"unknown timeline option `{_shown_option(tokens[i])}`.", usage=usage)
        if name in seen:
            raise UsageError(f"`{name}` is given twice; give it once.", usage=usage)
        seen.add(name)
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(tokens):
            value, i = tokens[i + 1], i + 2
        else:
            raise UsageError(f"`{name}` needs a value, e.g. `{name} {'#incident' if name == '--channel' else '2h'}`.", usage=usage)
        try:
            if name == "--channel":
                params["channel"] = channel_of(value) or "all"
            else:
                parse_since(value)
                params[name[2:]] = value
        except ValueError as exc:
            raise UsageError(str(exc), usage=usage) from None
    return Invocation(command="timeline", params=params, flags=Flags(), text=text.strip())


def _shown_option(token: str) -> str:
    return "".join(c if c.isprintable() and c != "`" else "?" for c in token[:40])


def command(name: str, config: Config | None = None) -> Command:
    """The command of this policy name: a built-in, or one of ``config``'s actions (KeyError: neither)."""
    found = BY_NAME.get(name)
    if found is not None:
        return found
    for action in actions_of(config) if config is not None else ():
        if action.name == name:
            return action
    raise KeyError(name)


def tokenize(text: str) -> list[str]:
    try:
        return shlex.split(text.translate(_QUOTES).replace("—", "--"))
    except ValueError as exc:
        raise UsageError(f"could not read the command: {exc} (a quote is not closed?)") from None


@functools.lru_cache(maxsize=16)
def _longest_first(commands: tuple[Command, ...]) -> tuple[Command, ...]:
    """The commands with the most words first (``replay webhook`` before a one-word action), sorted
    once per set of commands rather than on every command typed."""
    return tuple(sorted(commands, key=lambda c: -len(c.words)))


def _lookup(tokens: list[str], config: Config) -> tuple[Command | None, list[str]]:
    for cmd in _longest_first(commands_of(config)):
        n = len(cmd.words)
        if [t.lower() for t in tokens[:n]] == list(cmd.words):
            return cmd, tokens[n:]
    return None, tokens


def _split_flags(cmd: Command, rest: list[str]) -> tuple[list[str], dict[str, Any]]:
    known = {**COMMON_FLAGS, **cmd.flags}
    args: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or token == "--":
            args.append(token)
            i += 1
            continue
        name, eq, inline = token.partition("=")
        kind = known.get(name)
        if kind is None:
            allowed = ", ".join(sorted(known))
            raise UsageError(f"unknown option `{name}` for `{' '.join(cmd.words)}`. Options: {allowed}.", usage=cmd.usage)
        if name in flags:  # the last one silently winning would make the card say something else than was typed
            raise UsageError(f"`{name}` is given twice; give it once.", usage=cmd.usage)
        if kind is bool:
            flags[name] = True
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(rest):
            value = rest[i + 1]
            i += 2
        else:
            raise UsageError(f"`{name}` needs a value, e.g. `{name} {'3' if kind is int else 'text'}`.", usage=cmd.usage)
        if kind is int:
            number = whole_number(value)
            if number is None:
                raise UsageError(number_problem(value, f"`{name}`"), usage=cmd.usage)
            flags[name] = number
        else:
            flags[name] = value
    return args, flags


def parse(text: str, config: Config) -> Invocation:
    """Parse ``/ops`` text into an Invocation, or raise a UserError that says what to type instead."""
    problem = check_command_text(text)
    if problem:
        raise UsageError(problem)
    tokens = tokenize(text)
    if not tokens or tokens[0].lower() in ("help", "-h", "--help"):
        return Invocation(command="help", params={"topic": " ".join(tokens[1:]).lower()}, flags=Flags(), text=text.strip())
    if tokens[0].lower() == "audit":
        return _parse_audit(tokens[1:], text, config)
    if tokens[0].lower() == "timeline":
        return _parse_timeline(tokens[1:], text)
    if tokens[0].lower() == "pending":
        if len(tokens) > 1:
            raise UsageError(f"`pending` takes no arguments, got `{' '.join(tokens[1:])}`.", usage=META_USAGE["pending"])
        return Invocation(command="pending", params={}, flags=Flags(), text=text.strip())
    if tokens[0].lower() == "cancel":
        if len(tokens) != 2 or len(tokens[1]) > 64:
            raise UsageError("`cancel` takes the request id from the card, e.g. `/ops cancel r-7kq2m9xa`.", usage=META_USAGE["cancel"])
        return Invocation(command="cancel", params={"request_id": tokens[1]}, flags=Flags(), text=text.strip())
    if tokens[0].lower() == "undo":
        return _parse_undo(tokens[1:], text)
    cmd, rest = _lookup(tokens, config)
    if cmd is None:
        first = tokens[0].lower()
        near = [c for c in commands_of(config) if c.words[0] == first]
        if near:
            raise UsageError(f"`{first}` what? Did you mean: " + " or ".join(f"`{c.usage}`" for c in near) + "?")
        raise UsageError(f"unknown command `{tokens[0]}`. Type `{HELP_USAGE}` for the commands you can run.")
    args, flags = _split_flags(cmd, rest)
    reason = str(flags.pop("--reason", "")).strip()
    if "--reason" in [t.partition("=")[0] for t in rest] and not reason:
        raise UsageError('`--reason` needs some text, e.g. `--reason "INC-142 queue backlog"`.', usage=cmd.usage)
    dry_run = bool(flags.pop("--dry-run", False))
    glass = flags.pop("--break-glass", None)
    if glass is not None and not str(glass).strip():
        raise UsageError('`--break-glass` needs the reason, e.g. `--break-glass "INC-9 checkout down, no approver awake"`.',
                         usage=cmd.usage)
    params = cmd.parse(args, flags, config)
    return Invocation(command=cmd.name, params=params, flags=Flags(reason=reason, dry_run=dry_run, break_glass=str(glass or "").strip()),
                      text=text.strip())
