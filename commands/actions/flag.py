"""`kind: flag` — being built (issue 10): refuses until then."""

from __future__ import annotations

from typing import Any, ClassVar

from bot.domain import Plan
from bot.errors import Refused
from bot.ports import Context
from commands.actions.base import ActionCommand, AnyAction
from commands.base import Params


class FlagCommand(ActionCommand):
    backend = "the platform database"
    extra_args: ClassVar[tuple[str, ...]] = ("value",)

    @classmethod
    def extra_usage(cls, spec: AnyAction) -> list[str]:
        return ["<" + "|".join(getattr(spec, "values", {})) + ">"]

    def check_extra(self, name: str, value: str) -> Any:
        return value

    async def plan(self, params: Params, ctx: Context) -> Plan:
        raise Refused("flag actions are not available yet in this build.")
