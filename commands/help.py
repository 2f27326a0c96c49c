"""`/ops help`: the commands this caller may run, one line each, and whether approval is needed.
The policy decides (the same ``decide`` the real path uses); this module only renders."""

from __future__ import annotations

from collections.abc import Callable

from bot.domain import Decision, DecisionKind
from commands.registry import COMMANDS, HELP_USAGE


def help_text(decide: Callable[[str], Decision]) -> str:
    lines = ["*opsbot commands you can run*"]
    hidden = 0
    for cmd in COMMANDS:
        decision = decide(cmd.name)
        if decision.kind is DecisionKind.DENY:
            hidden += 1
            continue
        note = ""
        if decision.kind is DecisionKind.NEEDS_APPROVAL:
            note = f" _(needs {decision.approvals_required} approval(s) from {', '.join(decision.approver_roles)})_"
        lines.append(f"• `{cmd.usage}` — {cmd.summary}{note}")
    if len(lines) == 1:
        lines.append("You may not run any command. Ask your platform team to add you to a role in the opsbot policy.")
    lines.append(f"• `{HELP_USAGE}` — this list.")
    lines.append('Any command takes `--reason "…"` (recorded with the request) and `--dry-run` (show the plan, change nothing).')
    if hidden:
        lines.append(f"_{hidden} more command(s) exist that your roles do not allow._")
    return "\n".join(lines)
