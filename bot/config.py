"""The YAML configuration: targets (deployments, databases, queues), roles and rules.

Loaded once, validated with pydantic into frozen models. Errors name the file, the key path and
what is wrong, e.g. ``policies/prod.yaml: deployments.worker.replicas.max: must be >= min (1)``.
Secrets are written as ``${ENV_VAR}`` and substituted from the environment at load time; a missing
variable is an error, never an empty string. ``${ENV_VAR:-default}`` names a default used when the
variable is not set (for values that are not secrets, e.g. an in-cluster health probe URL).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from bot.action_config import Action, action_environment, check_actions
from bot.errors import ConfigError
from bot.messages import plural

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^([0-9]{1,9})\s*([smhd])$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Every command opsbot knows, by its policy name (what `rules[].commands` lists).
KNOWN_COMMANDS = ("help", "status", "history", "pods", "events", "logs", "scale", "rollback", "restart", "hpa", "backup",
                  "replay-webhook", "disable-provider", "enable-provider", "audit",
                  "queue-stats", "queue-failed", "queue-retry", "queue-retry-failed", "queue-pause", "queue-resume", "queue-clean",
                  "db-sessions", "db-queries", "db-cancel", "db-terminate", "redis-info", "redis-len", "health")
READ_ONLY_COMMANDS = ("help", "status", "history", "pods", "events", "logs", "audit", "queue-stats", "queue-failed",
                      "db-sessions", "db-queries", "redis-info", "redis-len", "health")
# Commands whose target is a configured deployment alias / cronjob alias.
DEPLOYMENT_COMMANDS = ("status", "history", "pods", "events", "logs", "scale", "rollback", "restart", "hpa")
CRONJOB_COMMANDS = ("backup",)
# Commands whose target is a configured queue (its key under `queues:`).
QUEUE_COMMANDS = ("queue-stats", "queue-failed", "queue-retry", "queue-retry-failed", "queue-pause", "queue-resume", "queue-clean")
# Commands on a configured database (`databases:`), Redis target (`redis:`), health service (`health:`).
DATABASE_COMMANDS = ("db-sessions", "db-queries", "db-cancel", "db-terminate")
REDIS_COMMANDS = ("redis-info", "redis-len")
HEALTH_COMMANDS = ("health",)
MAX_PROBE_TIMEOUT = 1.5  # seconds; a read-only answer is due within 2 s (bot/pipeline.py READ_DEADLINE)
MAX_PROBES = 40  # in all services together: `/ops health` calls them all at once


def parse_duration(value: str | int) -> int:
    """'15m' → 900. Bare integers are seconds."""
    if isinstance(value, int):
        return value
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a duration; write e.g. 90s, 15m, 2h or 1d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


_SINCE = re.compile(r"([0-9]{1,7})([mhdw])")
_SINCE_MAX_SECONDS = 100 * 366 * 86400


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """'7d', '12h', '30m' ago, or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    units = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    m = _SINCE.fullmatch(text)
    if m:
        seconds = int(m.group(1)) * units[m.group(2)]
        if seconds > _SINCE_MAX_SECONDS:
            raise ValueError(f"{text!r} reaches back more than 100 years; give a date instead (2026-11-01)")
        return now - timedelta(seconds=seconds)
    try:
        if not text.isascii():
            raise ValueError(text)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (7d, 12h, 30m) nor a date (2026-11-01 or 2026-11-01T12:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _command_name(name: str) -> str:
    """A command's policy name: a built-in's or an action's (checked by Config, which knows the actions)."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,39}", name):
        raise ValueError(f"unknown command {name!r}; known: {', '.join(KNOWN_COMMANDS)} and the names under actions:")
    return name


Duration = Annotated[int, BeforeValidator(parse_duration)]  # "15m" → 900
CommandName = Annotated[str, AfterValidator(_command_name)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _ident(value: str) -> str:
    if not _IDENT.match(value):
        raise ValueError(f"{value!r} is not a plain SQL identifier (letters, digits, underscore)")
    return value


class SlackConfig(_Model):
    audit_channel: str | None = None
    # Commands are taken only in these channels (e.g. incident channels); empty: anywhere.
    # `help` works everywhere, so people can learn where to go.
    allowed_channels: tuple[str, ...] = ()
    # How long Slack user-group memberships are cached in Redis.
    usergroup_cache: Duration = 60



class Role(_Model):
    users: tuple[str, ...] = ()
    usergroups: tuple[str, ...] = ()  # Slack user group ids (S…), resolved with usergroups.users.list


class Environment(_Model):
    kube_context: str | None = None
    frozen: str | None = None


class ReplicaRange(_Model):
    min: int = Field(0, ge=0)
    max: int = Field(50, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class Deployment(_Model):
    environment: str
    namespace: str
    name: str
    replicas: ReplicaRange = ReplicaRange(min=0, max=50)


class CronJob(_Model):
    environment: str
    namespace: str
    name: str


class Database(_Model):
    url: str
    environment: str


def _unsubstituted(value: str) -> bool:
    """A value still holding ``${VAR}`` (`opsbot policy check` without the secrets): not checked further."""
    return "${" in value


_KEY_PATTERN_MAX = 200


def key_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not an allow-list pattern for Redis keys, or None. Patterns are exact key
    names with ``*`` (any run of characters, ``:`` included) and ``?`` (one character); Redis's
    ``[…]`` classes and ``\\`` escapes are not taken, so that a pattern means the same to everyone."""
    if not pattern:
        return "an empty pattern matches no key"
    if len(pattern) > _KEY_PATTERN_MAX:
        return f"a pattern has at most {_KEY_PATTERN_MAX} characters"
    if not pattern.isprintable() or any(c.isspace() for c in pattern):
        return f"{pattern!r} contains whitespace or control characters"
    odd = sorted(set(pattern) & set("[]\\"))
    if odd:
        return f"{pattern!r} uses {' '.join(odd)}; only the wildcards * and ? are taken"
    return None


def glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.S)


class RedisTarget(_Model):
    """A platform's Redis that `/ops redis info|len` may look at."""

    url: str
    environment: str
    # `redis len` reads only keys matching one of these (`*` and `?` wildcards), e.g. ["email_queue", "bull:*:wait"].
    keys: tuple[str, ...] = ()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if _unsubstituted(v):
            return v
        scheme = v.partition("://")[0].lower() if "://" in v else ""
        if scheme not in ("redis", "rediss", "unix"):  # the URL itself is not echoed: it may hold a password
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL (got {f'scheme {scheme!r}' if scheme else 'no scheme'})")
        return v

    @field_validator("keys")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            problem = key_pattern_problem(pattern)
            if problem:
                raise ValueError(problem)
        return v

    def allows(self, key: str) -> bool:
        return any(glob_regex(p).fullmatch(key) for p in self.keys)


_PROBE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]{0,199}$")


def probe_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a health probe's URL, or None."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:  # (checked first: such a URL is not echoed)
        return "probe URLs may not carry credentials (they would be shown in chat and kept in the audit trail)"
    if parts.scheme not in ("http", "https"):
        return f"{url!r} is not an http:// or https:// URL"
    if not parts.hostname:
        return f"{url!r} has no host"
    if parts.fragment:
        return f"{url!r} has a #fragment, which is never sent"
    if not url.isprintable() or any(c.isspace() for c in url):
        return f"{url!r} contains whitespace or control characters"
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError as exc:
        return f"{url!r}: {exc}"
    return None


class HealthProbe(_Model):
    """One HTTP GET of a service's health: `/healthz`, `/readyz`, `/v1/health`, or a line of `/metrics`."""

    name: str
    url: str
    expect: int | None = Field(None, ge=100, le=599)  # the status that means healthy; default: any 2xx
    metric: str | None = None  # a Prometheus metric whose line(s) to show from a text exposition body
    timeout: float = Field(1.0, gt=0, le=MAX_PROBE_TIMEOUT)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _PROBE_NAME.match(v):
            raise ValueError(f"{v!r} is not a probe name (letters, digits, '.', '_', '-'; at most 40)")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        problem = None if _unsubstituted(v) else probe_url_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and not _METRIC_NAME.match(v):
            raise ValueError(f"{v!r} is not a Prometheus metric name")
        return v


class HealthService(_Model):
    environment: str
    probes: tuple[HealthProbe, ...] = Field(min_length=1, max_length=10)

    @field_validator("probes")
    @classmethod
    def _unique(cls, v: tuple[HealthProbe, ...]) -> tuple[HealthProbe, ...]:
        names = [p.name for p in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"probe name(s) {', '.join(twice)} appear more than once")
        return v


class Queue(_Model):
    redis_url: str
    name: str
    prefix: str = "bull"
    environment: str


class JobSpec(_Model):
    name: str = "process"
    data: dict[str, Any] = {}


class Webhooks(_Model):
    database: str
    schema_: str | None = Field(None, alias="schema")  # e.g. NepXy's `app`; default: the search_path
    table: str
    id_column: str = "id"
    status_column: str = "status"
    error_column: str | None = "last_error"
    replayable: tuple[str, ...] = ("failed", "pending")
    reset_to: str = "pending"
    queue: str
    job: JobSpec = JobSpec()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    _idents = field_validator("schema_", "table", "id_column", "status_column", "error_column")(
        lambda v: v if v is None else _ident(v)
    )


class Providers(_Model):
    database: str
    schema_: str | None = Field(None, alias="schema")
    table: str = "Provider"
    key: str = "name"
    active_column: str = "isActive"

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    _idents = field_validator("schema_", "table", "key", "active_column")(lambda v: v if v is None else _ident(v))


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class Window(_Model):
    """A weekly time window in UTC. ``end`` before ``start`` wraps past midnight; ``days`` name
    the day the window starts on."""

    days: tuple[str, ...] = _DAYS
    start: str
    end: str

    @field_validator("days")
    @classmethod
    def _days(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            if d not in _DAYS:
                raise ValueError(f"{d!r} is not a day; write {', '.join(_DAYS)}")
        return v

    @field_validator("start", "end")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _HHMM.match(str(v)):
            raise ValueError(f"{v!r} is not a time; write HH:MM in UTC, e.g. 02:00")
        return str(v)

    def contains(self, now: datetime) -> bool:
        now = now.astimezone(UTC)
        minute = now.hour * 60 + now.minute
        start = int(self.start[:2]) * 60 + int(self.start[3:])
        end = int(self.end[:2]) * 60 + int(self.end[3:])
        today = _DAYS[now.weekday()]
        yesterday = _DAYS[(now.weekday() - 1) % 7]
        if start < end:
            return today in self.days and start <= minute < end
        # wraps midnight: the part after start on a listed day, or before end on the day after one
        return (today in self.days and minute >= start) or (yesterday in self.days and minute < end)

    def describe(self) -> str:
        days = "every day" if set(self.days) == set(_DAYS) else ",".join(self.days)
        return f"{days} {self.start}–{self.end} UTC"


class Conditions(_Model):
    """``when:`` on a rule: the rule applies only when all of these hold for the plan."""

    replicas_above: int | None = None  # scale: the new replica count is above N
    scale_factor_above: float | None = None  # scale: new/old (or old/new when scaling down) is above X
    revisions_back_above: int | None = None  # rollback: the target is more than N revisions back
    inside_window: Window | None = None
    outside_window: Window | None = None


class Approval(_Model):
    from_: tuple[str, ...] = Field(alias="from")
    count: int = Field(1, ge=1)
    # At least one approval from a member of each of these roles (distinct people).
    each_of: tuple[str, ...] = ()
    expires: Duration = 15 * 60
    # Nobody acted after `remind_after`: each eligible approver gets a direct message with a link to
    # the card (0: no reminders). After `escalate_after`, the people of `escalate_to` are told too and
    # may approve from then on (the count and each_of stay as they are). Break-glass reviews are
    # reminded from `remind_after` on, with backoff, until someone acknowledges.
    remind_after: Duration = 10 * 60
    escalate_after: Duration | None = None
    escalate_to: tuple[str, ...] = ()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _reminders(self) -> Approval:
        if self.remind_after < 0:
            raise ValueError("remind_after must be a duration (10m) or 0 for no reminders")
        if "remind_after" in self.model_fields_set and self.remind_after and self.remind_after >= self.expires:
            raise ValueError(f"remind_after ({self.remind_after} s) must be shorter than expires ({self.expires} s), or the "
                             "request expires before anyone is reminded; shorten it or raise expires")
        if self.escalate_to and self.escalate_after is None:
            raise ValueError("escalate_to is set but escalate_after is not; write e.g. escalate_after: 30m")
        if self.escalate_after is not None:
            if not self.escalate_to:
                raise ValueError("escalate_after is set but escalate_to is not; name the role(s) to escalate to, "
                                 "e.g. escalate_to: [oncall-leads]")
            if self.escalate_after <= 0:
                raise ValueError("escalate_after must be a positive duration, e.g. 30m")
            if self.escalate_after >= self.expires:
                raise ValueError(f"escalate_after ({self.escalate_after} s) must be shorter than expires ({self.expires} s), or "
                                 "the request expires before it is escalated; shorten it or raise expires")
            if self.remind_after and self.escalate_after <= self.remind_after:
                raise ValueError(f"escalate_after ({self.escalate_after} s) must be later than remind_after "
                                 f"({self.remind_after} s): remind the approvers first, then escalate")
        return self



class Rule(_Model):
    name: str | None = None
    commands: tuple[CommandName, ...]
    allow: tuple[str, ...] = ()
    approval: Approval | None = None
    environments: tuple[str, ...] = ()  # empty: all environments
    targets: tuple[str, ...] = ()  # deployment aliases / provider names; empty: all targets
    channels: tuple[str, ...] = ()  # empty: any channel the global allowlist admits
    when: Conditions | None = None
    # Roles that may run these commands without waiting for approval, with --break-glass "<reason>";
    # the approvers then review it after the fact.
    break_glass: tuple[str, ...] = ()
    max_open_per_user: int | None = None

    @model_validator(mode="after")
    def _each_of_within_from(self) -> Rule:
        if self.approval:
            outside = [r for r in self.approval.each_of if r not in self.approval.from_]
            if outside:
                raise ValueError(f"approval.each_of names {outside} which are not in approval.from")
            if len(self.approval.each_of) > self.approval.count:
                raise ValueError(f"approval.each_of needs {len(self.approval.each_of)} distinct approvers but count is "
                                 f"{self.approval.count}; raise count")
        return self


class RateLimit(_Model):
    commands: tuple[CommandName, ...] = ()  # empty: every mutating command
    per_user: int = Field(ge=1)
    window: Duration



class Limits(_Model):
    max_open_requests_per_user: int = 5
    rate: tuple[RateLimit, ...] = ()


class Config(_Model):
    slack: SlackConfig = SlackConfig()
    roles: dict[str, Role] = {}
    environments: dict[str, Environment] = {}
    deployments: dict[str, Deployment] = {}
    cronjobs: dict[str, CronJob] = {}  # aliases for `/ops backup <alias>`
    databases: dict[str, Database] = {}
    queues: dict[str, Queue] = {}
    redis: dict[str, RedisTarget] = {}  # platform Redis instances for `/ops redis info|len`
    health: dict[str, HealthService] = {}  # HTTP probes for `/ops health [<service>]`
    webhooks: Webhooks | None = None
    providers: Providers | None = None
    # Named sets of targets for rules[].targets, e.g. {payments: ["provider:twilio", "provider:vonage"]}.
    target_groups: dict[str, tuple[str, ...]] = {}
    # The platform's own runbook actions, by kind (sql, http, flag, queue): bot/action_config.py.
    actions: dict[str, Action] = {}
    rules: tuple[Rule, ...] = ()
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _references(self) -> Config:
        def env(where: str, name: str) -> None:
            if name not in self.environments:
                raise ValueError(f"{where}: environment {name!r} is not defined under environments "
                                 f"(defined: {', '.join(self.environments) or 'none'})")

        for alias, d in self.deployments.items():
            env(f"deployments.{alias}.environment", d.environment)
        for alias, cj in self.cronjobs.items():
            env(f"cronjobs.{alias}.environment", cj.environment)
            if alias in self.deployments:
                raise ValueError(f"cronjobs.{alias}: the alias is also a deployment; rules' targets could not tell them apart")
        for alias in self.queues:
            if alias in self.deployments or alias in self.cronjobs:
                raise ValueError(f"queues.{alias}: the key is also a deployment or cronjob alias; rules' targets could not tell "
                                 "them apart")
        for name, db in self.databases.items():
            env(f"databases.{name}.environment", db.environment)
        for name, q in self.queues.items():
            env(f"queues.{name}.environment", q.environment)
        for name, r in self.redis.items():
            env(f"redis.{name}.environment", r.environment)
        for name, svc in self.health.items():
            env(f"health.{name}.environment", svc.environment)
        probes = sum(len(svc.probes) for svc in self.health.values())
        if probes > MAX_PROBES:
            raise ValueError(f"health: {probes} probes in all; at most {MAX_PROBES} (`/ops health` calls them all at once)")
        if self.webhooks:
            if self.webhooks.database not in self.databases:
                raise ValueError(f"webhooks.database: {self.webhooks.database!r} is not defined under databases")
            if self.webhooks.queue not in self.queues:
                raise ValueError(f"webhooks.queue: {self.webhooks.queue!r} is not defined under queues")
        if self.providers and self.providers.database not in self.databases:
            raise ValueError(f"providers.database: {self.providers.database!r} is not defined under databases")
        check_actions(self, KNOWN_COMMANDS)
        commands = (*KNOWN_COMMANDS, *self.actions)
        for i, rule in enumerate(self.rules):
            for j, c in enumerate(rule.commands):
                if c not in commands:
                    raise ValueError(f"rules[{i}].commands[{j}]: unknown command {c!r}; known: {', '.join(commands)}")
            for role in (*rule.allow, *(rule.approval.from_ if rule.approval else ()), *rule.break_glass,
                         *(rule.approval.escalate_to if rule.approval else ())):
                if role not in self.roles:
                    raise ValueError(f"rules[{i}]: role {role!r} is not defined under roles "
                                     f"(defined: {', '.join(self.roles) or 'none'})")
            for e in rule.environments:
                env(f"rules[{i}].environments", e)
            for t in rule.targets:
                if not self._known_target(t):
                    raise ValueError(f"rules[{i}].targets: {t!r} is not a deployment, cronjob or queue alias, a database, Redis "
                                     f"target, health service or action name, a target group, `deployments`, `cronjobs`, "
                                     f"`queues`, `databases`, `redis`, `health`, `actions`, `webhooks`, `providers` or "
                                     f"`provider:<name>` "
                                     f"(names: {', '.join(self._target_names()) or 'none'})")
        for i, limit in enumerate(self.limits.rate):
            for j, c in enumerate(limit.commands):
                if c not in commands:
                    raise ValueError(f"limits.rate[{i}].commands[{j}]: unknown command {c!r}; known: {', '.join(commands)}")
        for g, members in self.target_groups.items():
            for t in members:
                if t in self.target_groups or not self._known_target(t):
                    raise ValueError(f"target_groups.{g}: {t!r} is not a deployment, cronjob or queue alias, a database, Redis "
                                     "target, health service or action name, `webhooks` or `provider:<name>`")
        return self

    def _target_names(self) -> list[str]:
        return list(dict.fromkeys([*self.deployments, *self.cronjobs, *self.queues, *self.databases, *self.redis, *self.health,
                                   *self.actions]))

    def _known_target(self, t: str) -> bool:
        return (t in self.deployments or t in self.cronjobs or t in self.queues or t in self.target_groups
                or t in self.databases or t in self.redis or t in self.health or t in self.actions
                or t in ("deployments", "cronjobs", "queues", "webhooks", "providers", "databases", "redis", "health", "actions")
                or (t.startswith("provider:") and len(t) > len("provider:")))

    def rule_name(self, index: int) -> str:
        return self.rules[index].name or f"rules[{index}]"

    def roles_of(self, user_id: str, groups: frozenset[str] = frozenset()) -> frozenset[str]:
        return frozenset(name for name, role in self.roles.items()
                         if user_id in role.users or groups.intersection(role.usergroups))

    @property
    def usergroups(self) -> frozenset[str]:
        return frozenset(g for role in self.roles.values() for g in role.usergroups)



def _substitute(value: Any, path: str, env: Mapping[str, str], missing: list[str] | None) -> Any:
    if isinstance(value, str):
        # Under `actions:` strings are templates ({name}); a variable's value is literal text there, so
        # its braces are doubled (a token with a `{` stays that token, it does not become a placeholder).
        literal = path.startswith("actions.")
        # An http action's URL and body are on the card and in the audit trail: a `${VAR}` there is the
        # URL's base (at its start) or has a default, never a secret; secrets go in `headers:` (never shown).
        shown = literal and (path.endswith(".url") or ".body" in path)

        def repl(m: re.Match[str]) -> str:
            default = m.group(2)
            if default == "":
                raise ConfigError(f"{path}: ${{{m.group(1)}:-}} has an empty default; give a value or drop the default")
            if shown and default is None and not (path.endswith(".url") and m.start() == 0):  # a base URL: a location
                raise ConfigError(f"{path}: ${{{m.group(1)}}} has no default. The URL and the body are shown on the card and kept "
                                  "in the audit trail, so they may not carry secrets: put a secret in `headers:` (never shown). "
                                  "A variable may start the URL (its base, e.g. ${ADMIN_URL}/v1/…); elsewhere it needs a "
                                  f"default: ${{{m.group(1)}:-value}}")
            if m.group(1) not in env and default is not None:
                found = default
            elif m.group(1) not in env:
                if missing is None:
                    raise ConfigError(f"{path}: environment variable {m.group(1)} is not set")
                missing.append(f"{path}: environment variable {m.group(1)} is not set (needed when opsbot runs)")
                return m.group(0)
            else:
                found = env[m.group(1)]
            return found.replace("{", "{{").replace("}", "}}") if literal else found
        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, f"{path}[{i}]", env, missing) for i, v in enumerate(value)]
    return value


def _error_path(loc: tuple[int | str, ...]) -> str:
    if len(loc) > 2 and loc[0] == "actions" and loc[2] in ("sql", "http", "flag", "queue"):  # pydantic's union tag
        loc = loc[:2] + loc[3:]
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after[_ordered(), ReplicaRange]",):
            out += ("." if out else "") + str(part)
    return out


def parse_config(text: str, *, source: str = "<config>", env: Mapping[str, str] | None = None,
                 missing_env: list[str] | None = None) -> Config:
    """``missing_env``: when a list is given, unset ${VARS} are left as they are and reported in it
    (for `opsbot policy check` on a machine without the secrets) instead of being an error."""
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (slack:, roles:, rules:, …)")
    try:
        raw = _substitute(raw, "", env, missing_env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            path = _error_path(tuple(err["loc"]))
            lines.append(f"{source}: {path}: {msg}" if path else f"{source}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None, missing_env: list[str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file: {exc.strerror}") from exc
    return parse_config(text, source=str(p), env=env, missing_env=missing_env)


_SCALE_ONLY = ("replicas_above", "scale_factor_above")
_ROLLBACK_ONLY = ("revisions_back_above",)


def _candidates(config: Config, command: str) -> list[tuple[set[str], str]]:
    """(names a rule's targets can match, environment) for every target ``command`` can act on."""
    if command == "audit":
        return [({"audit"}, "")]
    if command in DEPLOYMENT_COMMANDS:
        return [({alias, "deployments"}, d.environment) for alias, d in config.deployments.items()]
    if command in CRONJOB_COMMANDS:
        return [({alias, "cronjobs"}, c.environment) for alias, c in config.cronjobs.items()]
    if command in QUEUE_COMMANDS:
        return [({alias, "queues"}, q.environment) for alias, q in config.queues.items()]
    if command == "replay-webhook" and config.webhooks:
        return [({"webhooks"}, config.databases[config.webhooks.database].environment)]
    if command in ("disable-provider", "enable-provider") and config.providers:
        env = config.databases[config.providers.database].environment
        return [({"providers", "provider:*"}, env)]
    if command in DATABASE_COMMANDS:
        return [({name, "databases"}, db.environment) for name, db in config.databases.items()]
    if command in REDIS_COMMANDS:  # `redis len` reads only allow-listed keys: a target without `keys:` is no target for it
        return [({name, "redis"}, r.environment) for name, r in config.redis.items() if command != "redis-len" or r.keys]
    if command in config.actions:  # an action's rules name it, or `actions`
        return [({command, "actions"}, action_environment(config, config.actions[command]))]
    if command in HEALTH_COMMANDS and config.health:
        every = [({name, "health"}, svc.environment) for name, svc in config.health.items()]
        return [*every, ({"health"}, health_environment(config))]  # `/ops health` with no service: all of them
    return []


def health_environment(config: Config) -> str:
    """The environment of `/ops health` with no service: the services' one environment, or "" when
    they are in several (then only rules without `environments:` match it)."""
    envs = {svc.environment for svc in config.health.values()}
    return envs.pop() if len(envs) == 1 else ""


def _rule_can_match(config: Config, rule: Rule, command: str) -> str | None:
    """None when ``rule`` can match ``command`` on some target; else why it cannot."""
    if command in ("help", "audit"):
        return None
    when = rule.when.model_dump(exclude_none=True) if rule.when else {}
    if command != "scale" and any(k in when for k in _SCALE_ONLY) and not (command == "hpa" and "scale_factor_above" not in when):
        return f"`when: {', '.join(k for k in when if k in _SCALE_ONLY)}` applies to scale only (replicas_above: scale and hpa)"
    if command != "rollback" and any(k in when for k in _ROLLBACK_ONLY):
        return "`when: revisions_back_above` applies to rollback only"
    allowed = config.slack.allowed_channels
    if rule.channels and allowed and not set(rule.channels) & set(allowed):
        return "its channels are all outside slack.allowed_channels"
    candidates = _candidates(config, command)
    if not candidates:
        return f"no target for `{command}` is configured"
    wanted: set[str] = set()
    for t in rule.targets:
        wanted |= set(config.target_groups.get(t, (t,)))
    for names, env in candidates:
        if rule.environments and env not in rule.environments:
            continue
        if rule.targets and not (names & wanted or ("provider:*" in names and any(w.startswith("provider:") for w in wanted))):
            continue
        return None
    return "no configured target is in " + " and ".join(
        part for part in (f"environments {list(rule.environments)}" if rule.environments else "",
                          f"targets {list(rule.targets)}" if rule.targets else "") if part) if (rule.environments or rule.targets) \
        else f"no target for `{command}` is configured"


def config_warnings(config: Config) -> list[str]:
    """Problems that do not stop the bot but will bite someone: reported by `opsbot policy check`."""
    warnings = []
    for name, q in config.queues.items():
        if ":" in q.name:
            warnings.append(
                f"queues.{name}.name: {q.name!r} contains ':'; Node BullMQ (>= 5.12.12) refuses queue names with ':', "
                "so a current Node worker cannot consume jobs opsbot adds there. Rename the queue (e.g. "
                f"{q.name.replace(':', '-')!r}) in the platform and here."
            )
    for name, role in config.roles.items():
        if not role.users and not role.usergroups:
            warnings.append(f"roles.{name}: has no members; nobody gets what this role grants")
    for i, rule in enumerate(config.rules):
        label = f"rules[{i}] ({config.rule_name(i)})"
        reasons = {c: _rule_can_match(config, rule, c) for c in rule.commands}
        if all(reasons.values()):
            warnings.append(f"{label}: can never match: " + "; ".join(f"{c}: {why}" for c, why in reasons.items()))
        if rule.approval:
            from_groups = any(config.roles[r].usergroups for r in rule.approval.from_)
            approvers = set().union(*(config.roles[r].users for r in rule.approval.from_))
            if not from_groups and len(approvers) < rule.approval.count:
                warnings.append(f"{label}: needs {plural(rule.approval.count, 'approval')} but only {plural(len(approvers), 'user')} "
                                "can approve (the requester never counts); such requests can never run")
            for each in rule.approval.each_of:
                if not config.roles[each].users and not config.roles[each].usergroups:
                    warnings.append(f"{label}: needs an approval from {each!r}, which has no members")
            for lead in rule.approval.escalate_to:
                if not config.roles[lead].users and not config.roles[lead].usergroups:
                    warnings.append(f"{label}: escalates to {lead!r}, which has no members; nobody would be told")
        for glass in rule.break_glass:
            if not config.roles[glass].users and not config.roles[glass].usergroups:
                warnings.append(f"{label}: break-glass role {glass!r} has no members")
    allowed = {c for rule in config.rules if rule.allow for c in rule.commands}
    for c in (*KNOWN_COMMANDS, *config.actions):
        if c != "help" and c not in allowed and _candidates(config, c):
            warnings.append(f"command {c!r}: no rule allows anyone to run it")
    for name, target in config.redis.items():
        if any(set(p) <= {"*"} for p in target.keys):
            warnings.append(f"redis.{name}.keys: a bare `*` allows every key; list the queues and keys people need to read")
    if not config.slack.audit_channel:
        warnings.append("slack.audit_channel: not set; the audit trail is kept in PostgreSQL only")
    return warnings
