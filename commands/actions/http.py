"""`kind: http` — being built (issue 10): refuses until then."""

from __future__ import annotations

from bot.domain import Plan
from bot.errors import Refused
from bot.ports import Context
from commands.actions.base import ActionCommand
from commands.base import Params


class HttpCommand(ActionCommand):
    backend = "the platform's admin API"

    async def plan(self, params: Params, ctx: Context) -> Plan:
        raise Refused("http actions are not available yet in this build.")
