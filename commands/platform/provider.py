"""`/ops disable provider <name>` / `/ops enable provider <name>` — seed 000's manual override:
set ``Provider.isActive`` so traffic routes to the backup providers. The UPDATE names the value it
expects to change (``WHERE isActive = <before>``), so a concurrent change is noticed, not
overwritten."""

from __future__ import annotations

from typing import Any, ClassVar

from bot.config import Config, Providers
from bot.domain import Outcome, Plan
from bot.errors import NotFound, Refused
from bot.ports import Context
from bot.untrusted import non_ascii_hint
from commands.base import Command, Inverse, Params, typed


def _spec(config: Config) -> Providers:
    if config.providers is None:
        raise Refused("provider toggles are not configured here (no `providers:` section in the config).")
    return config.providers


def _bool(value: bool) -> str:
    """A boolean column's value as SQL and JSON write it (``true``), not as Python's ``True``."""
    return "true" if value else "false"


def _table(spec: Providers) -> str:
    """The table as the UPDATE names it: schema-qualified when the config gives a schema (NepXy's `app`)."""
    return f'"{spec.schema_}"."{spec.table}"' if spec.schema_ else f'"{spec.table}"'


class _ProviderToggle(Command):
    active: ClassVar[bool]

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        self.expect_args(args, ["provider name"])
        _spec(config)
        return {"provider": args[0]}

    def locate(self, params: Params, config: Config) -> Plan | None:
        spec = _spec(config)
        return Plan(command=self.name, target=f"provider/{spec.database}/{spec.table}/{params['provider']}",
                    target_label=f"provider {params['provider']}", environment=config.databases[spec.database].environment,
                    target_name=f"provider:{params['provider']}", target_kind="providers", params=params,
                    summary=f"{' '.join(self.words)} {params['provider']} (not read)")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        spec = _spec(ctx.config)
        row = await ctx.databases.provider(spec, params["provider"])
        if row is None:
            names = await ctx.databases.provider_names(spec)
            name = params["provider"]
            raise NotFound(f"unknown provider `{name}`{non_ascii_hint(name)}. Known providers: {', '.join(names) or 'none'}.")
        current = bool(row[spec.active_column])
        if current == self.active:
            raise Refused(f"provider `{params['provider']}` is already {'enabled' if current else 'disabled'}; nothing to do.")
        verb = "enable" if self.active else "disable"
        return Plan(
            command=self.name,
            target=f"provider/{spec.database}/{spec.table}/{params['provider']}",
            target_label=f"provider {params['provider']}",
            environment=ctx.config.databases[spec.database].environment,
            target_name=f"provider:{params['provider']}",
            target_kind="providers",
            params=params,
            summary=f"{verb} provider {params['provider']}: {spec.active_column} {_bool(current)} → {_bool(self.active)}",
            details=(f'table {_table(spec)} in database `{spec.database}`',),
            before={spec.active_column: current},
            after={spec.active_column: self.active},
        )

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        spec = _spec(ctx.config)
        changed = await ctx.databases.set_provider_active(spec, plan.params["provider"], active=self.active,
                                                          expect=not self.active)
        if not changed:
            raise Refused(f"provider `{plan.params['provider']}` changed since the plan; nothing was written.")
        return Outcome(ok=True, message=f"provider {plan.params['provider']} is now {'enabled' if self.active else 'disabled'}.")

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        name, verb = original_plan["params"]["provider"], "disable" if self.active else "enable"
        return Inverse(text=typed(verb, "provider", name), why=f"{verb} provider {name} again")

    def moved_on(self, original_plan: dict[str, Any], fresh: Plan, request_id: str) -> str | None:
        # The inverse's own plan refuses "already enabled/disabled" when someone toggled it back;
        # what is left to compare is the column the original set.
        then, now = original_plan.get("after") or {}, fresh.before
        if all(now.get(k) == v for k, v in then.items()):
            return None
        state = "enabled" if self.active else "disabled"
        return f"provider {original_plan['params']['provider']} is no longer {state} as `{request_id}` left it"


class DisableProvider(_ProviderToggle):
    name = "disable-provider"
    words = ("disable", "provider")
    usage = "/ops disable provider <name>"
    summary = "Mark a provider inactive so traffic routes to the backups."
    backend = "the platform database"
    active = False


class EnableProvider(_ProviderToggle):
    name = "enable-provider"
    words = ("enable", "provider")
    usage = "/ops enable provider <name>"
    summary = "Mark a provider active again."
    backend = "the platform database"
    active = True
