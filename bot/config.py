"""The YAML configuration: targets (deployments, databases, queues), roles and rules.

Loaded once, validated with pydantic into frozen models. Errors name the file, the key path and
what is wrong, e.g. ``policies/prod.yaml: deployments.worker.replicas.max: must be >= min (1)``.
Secrets are written as ``${ENV_VAR}`` and substituted from the environment at load time; a missing
variable is an error, never an empty string.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bot.errors import ConfigError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Every command opsbot knows, by its policy name (what `rules[].commands` lists).
KNOWN_COMMANDS = ("help", "status", "scale", "rollback", "replay-webhook", "disable-provider", "enable-provider")


def parse_duration(value: str | int) -> int:
    """'15m' → 900. Bare integers are seconds."""
    if isinstance(value, int):
        return value
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a duration; write e.g. 90s, 15m, 2h or 1d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _ident(value: str) -> str:
    if not _IDENT.match(value):
        raise ValueError(f"{value!r} is not a plain SQL identifier (letters, digits, underscore)")
    return value


class SlackConfig(_Model):
    audit_channel: str | None = None


class Role(_Model):
    users: tuple[str, ...] = ()


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


class Database(_Model):
    url: str
    environment: str


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
    table: str
    id_column: str = "id"
    status_column: str = "status"
    error_column: str | None = "last_error"
    replayable: tuple[str, ...] = ("failed", "pending")
    reset_to: str = "pending"
    queue: str
    job: JobSpec = JobSpec()

    _idents = field_validator("table", "id_column", "status_column", "error_column")(
        lambda v: v if v is None else _ident(v)
    )


class Providers(_Model):
    database: str
    table: str = "Provider"
    key: str = "name"
    active_column: str = "isActive"

    _idents = field_validator("table", "key", "active_column")(_ident)


class Approval(_Model):
    from_: tuple[str, ...] = Field(alias="from")
    count: int = Field(1, ge=1)
    expires: int = 15 * 60

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("expires", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> int:
        return parse_duration(v)


class Rule(_Model):
    name: str | None = None
    commands: tuple[str, ...]
    allow: tuple[str, ...] = ()
    approval: Approval | None = None
    environments: tuple[str, ...] = ()  # empty: all environments

    @field_validator("commands")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for c in v:
            if c not in KNOWN_COMMANDS:
                raise ValueError(f"unknown command {c!r}; known: {', '.join(KNOWN_COMMANDS)}")
        return v


class Config(_Model):
    slack: SlackConfig = SlackConfig()
    roles: dict[str, Role] = {}
    environments: dict[str, Environment] = {}
    deployments: dict[str, Deployment] = {}
    databases: dict[str, Database] = {}
    queues: dict[str, Queue] = {}
    webhooks: Webhooks | None = None
    providers: Providers | None = None
    rules: tuple[Rule, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> Config:
        def env(where: str, name: str) -> None:
            if name not in self.environments:
                raise ValueError(f"{where}: environment {name!r} is not defined under environments "
                                 f"(defined: {', '.join(self.environments) or 'none'})")

        for alias, d in self.deployments.items():
            env(f"deployments.{alias}.environment", d.environment)
        for name, db in self.databases.items():
            env(f"databases.{name}.environment", db.environment)
        for name, q in self.queues.items():
            env(f"queues.{name}.environment", q.environment)
        if self.webhooks:
            if self.webhooks.database not in self.databases:
                raise ValueError(f"webhooks.database: {self.webhooks.database!r} is not defined under databases")
            if self.webhooks.queue not in self.queues:
                raise ValueError(f"webhooks.queue: {self.webhooks.queue!r} is not defined under queues")
        if self.providers and self.providers.database not in self.databases:
            raise ValueError(f"providers.database: {self.providers.database!r} is not defined under databases")
        for i, rule in enumerate(self.rules):
            for role in (*rule.allow, *(rule.approval.from_ if rule.approval else ())):
                if role not in self.roles:
                    raise ValueError(f"rules[{i}]: role {role!r} is not defined under roles "
                                     f"(defined: {', '.join(self.roles) or 'none'})")
            for e in rule.environments:
                env(f"rules[{i}].environments", e)
        return self

    def rule_name(self, index: int) -> str:
        return self.rules[index].name or f"rules[{index}]"

    def roles_of(self, user_id: str) -> frozenset[str]:
        return frozenset(name for name, role in self.roles.items() if user_id in role.users)


def _substitute(value: Any, path: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise ConfigError(f"{path}: environment variable {m.group(1)} is not set")
            return env[m.group(1)]
        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _error_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after[_ordered(), ReplicaRange]",):
            out += ("." if out else "") + str(part)
    return out


def parse_config(text: str, *, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (slack:, roles:, rules:, …)")
    try:
        raw = _substitute(raw, "", env)
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


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file: {exc.strerror}") from exc
    return parse_config(text, source=str(p), env=env)


Severity = Literal["error", "warning"]


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
        if not role.users:
            warnings.append(f"roles.{name}: has no members; nobody gets what this role grants")
    for i, rule in enumerate(config.rules):
        if rule.approval:
            approvers = set().union(*(config.roles[r].users for r in rule.approval.from_))
            if len(approvers) < rule.approval.count:
                warnings.append(
                    f"rules[{i}] ({config.rule_name(i)}): needs {rule.approval.count} approvals but only "
                    f"{len(approvers)} user(s) can approve; such requests can never run"
                )
    allowed = {c for rule in config.rules if rule.allow for c in rule.commands}
    for c in KNOWN_COMMANDS:
        if c not in allowed:
            warnings.append(f"command {c!r}: no rule allows anyone to run it")
    if not config.slack.audit_channel:
        warnings.append("slack.audit_channel: not set; the audit trail is kept in PostgreSQL only")
    return warnings
