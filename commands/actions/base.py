"""What every configured action shares: typed positional parameters, the usage line, the plan's target.

An action is a ``Command`` made from its YAML (bot/action_config.py) by ``make_command``: the class is
built per action so that ``name``/``words``/``usage`` are what the config says, and everything after
parsing (policy, approval, the worker's re-plan and fingerprint check, audit) is the built-ins' path.

Every value is checked before anything is read: ``int`` with the ASCII digits 0-9 within min/max,
``uuid`` in its usual hex form (normalised to lowercase with hyphens), ``enum`` one of its words,
``string`` ASCII only and matching its ``pattern`` as a whole (``re.ASCII``: ``\\w`` does not take
look-alike letters), at most ``max_length``. A refusal says what is accepted.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from bot.action_config import (
    BUILTIN_VARS,
    FlagAction,
    HttpAction,
    Param,
    QueueAction,
    SqlAction,
    action_environment,
    action_words,
    canonical_uuid,
)
from bot.config import Config
from bot.domain import Plan, sha256_hex
from bot.errors import UsageError
from bot.ports import Context
from bot.untrusted import char_name, non_ascii_hint, number_problem, whole_number
from commands.base import Command, Params

AnyAction = SqlAction | HttpAction | FlagAction | QueueAction
MAX_SHOWN = 80  # characters of a refused value repeated in the answer


def shown_value(value: str) -> str:
    """A refused value, bounded and inert, for the answer (it is not echoed whole: it may be 200 kB)."""
    cut = value[:MAX_SHOWN] + (f"… ({len(value):,} characters)" if len(value) > MAX_SHOWN else "")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in cut).replace("`", "'")


def check_value(name: str, p: Param, value: str, usage: str) -> str | int:
    """``value`` as the parameter's type, or a UsageError saying what to type instead."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"`{name}`: {why}", usage=usage)

    if len(value) > max(p.max_length if p.type == "string" else 64, 64):
        raise refuse(f"`{shown_value(value)}` is {len(value):,} characters long; {p.describe()} is expected.")
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise refuse(f"the value contains {char_name(bad)}; retype it without that character.")
    if p.type == "int":
        number = whole_number(value)
        if number is None:
            raise refuse(number_problem(value, "the value"))
        if (p.min is not None and number < p.min) or (p.max is not None and number > p.max):
            raise refuse(f"{number} is outside {p.describe().removeprefix('a whole number ')}.")
        return number
    if p.type == "uuid":
        canonical = canonical_uuid(value)
        if canonical is None:
            raise refuse(f"`{shown_value(value)}` is not a UUID (like 8f2c1e4a-3b5d-4c6e-9f70-1a2b3c4d5e6f)"
                         f"{non_ascii_hint(value[:MAX_SHOWN])}.")
        return canonical
    if p.type == "enum":
        for word in p.values:
            if value.lower() == word.lower():
                return word
        raise refuse(f"`{shown_value(value)}` is not one of {', '.join(f'`{w}`' for w in p.values)}"
                     f"{non_ascii_hint(value[:MAX_SHOWN])}.")
    if not value.isascii():
        raise refuse(f"`{shown_value(value)}`{non_ascii_hint(value[:MAX_SHOWN])}.")
    if len(value) > p.max_length:
        raise refuse(f"at most {p.max_length} characters, got {len(value):,}.")
    if not re.fullmatch(str(p.pattern), value, re.ASCII):
        raise refuse(f"`{shown_value(value)}` is not {p.describe()}.")
    return value


class ActionCommand(Command):
    """The parts every kind shares. Subclasses (one per kind) plan and execute."""

    action_name: ClassVar[str]
    spec: ClassVar[Any]  # the kind's model (SqlAction, HttpAction, FlagAction, QueueAction)
    extra_args: ClassVar[tuple[str, ...]] = ()  # a flag's last argument: the value
    backend = "the platform"

    @classmethod
    def usage_line(cls, name: str, spec: AnyAction) -> str:
        parts = [f"<{n}>" if p.default is None else f"[<{n}>]" for n, p in spec.params.items()]
        return " ".join(["/ops", *action_words(name, spec), *parts, *cls.extra_usage(spec)])

    @classmethod
    def extra_usage(cls, spec: AnyAction) -> list[str]:
        return []

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        spec = self.spec
        names = [*spec.params, *self.extra_args]
        required = [n for n, p in spec.params.items() if p.default is None]
        if len(args) > len(names):
            extra = args[len(names):]
            raise self.usage_error(f"unexpected argument{'s' if len(extra) > 1 else ''} `{shown_value(' '.join(extra))}`.")
        given = dict(zip(names, args, strict=False))
        missing = [n for n in [*required, *self.extra_args] if n not in given]
        if missing:
            what = self.describe_arg(missing[0])
            raise self.usage_error(f"`{' '.join(self.words)}` needs the {missing[0]} ({what}).")
        params: Params = {}
        for n, p in spec.params.items():
            params[n] = check_value(n, p, given.get(n, str(p.default)), self.usage)
        for n in self.extra_args:
            params[n] = self.check_extra(n, given[n])
        self.check_params(params)
        return params

    def describe_arg(self, name: str) -> str:
        p = self.spec.params.get(name)
        return p.describe() if p is not None else name

    def check_extra(self, name: str, value: str) -> Any:
        raise NotImplementedError

    def check_params(self, params: Params) -> None:
        """A kind's own checks on the typed values (an http action refuses `/` and `..` in URL slots)."""

    def variables(self, params: Params, ctx: Context | None, *, running: bool) -> dict[str, Any]:
        """What templates may name: the parameters and, when running, ``request_id``, ``requester`` and
        ``reason``; in a plan these three are shown as ``<request id>`` and so on (they do not exist yet)."""
        values: dict[str, Any] = dict(params)
        if running and ctx is not None:
            values.update(request_id=ctx.request_id, requester=ctx.requester, reason=ctx.reason)
        else:
            values.update({v: f"<{v.replace('_', ' ')}>" for v in BUILTIN_VARS})
        return values

    def target_key(self, params: Params) -> str:
        """One action per target at a time (the worker's lock): this action on these values."""
        shown = "/".join(str(params[n]) for n in self.spec.params)
        return f"action/{self.action_name}" + (f"/{shown}" if shown else "")

    def label(self, params: Params) -> str:
        values = " ".join(str(params[n]) for n in [*self.spec.params, *self.extra_args])
        return f"{' '.join(self.words)} {values}".strip()

    def skeleton(self, params: Params, config: Config, **fields: Any) -> Plan:
        """A Plan of this action. ``observed`` always holds a hash of the action's definition, so an
        approval covers *this* statement/URL/job: a config reloaded with another one makes it stale."""
        fields["observed"] = {**fields.get("observed", {}), "definition": self.definition()}
        base: dict[str, Any] = {"command": self.name, "target": self.target_key(params), "target_label": self.label(params),
                                "environment": action_environment(config, self.spec), "target_name": self.name,
                                "target_kind": "actions", "params": params, "mutating": True,
                                "summary": f"{self.label(params)} (not read)"}
        base.update(fields)
        return Plan(**base)

    def definition(self) -> str:
        """A short hash of the action's YAML; header values (secrets, rotated at will) are left out."""
        spec = self.spec.model_dump(mode="json", by_alias=True)
        if "headers" in spec:
            spec["headers"] = sorted(spec["headers"])
        return "sha256:" + sha256_hex(spec)[:16]

    def locate(self, params: Params, config: Config) -> Plan | None:
        return self.skeleton(params, config)
