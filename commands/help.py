"""`/ops help` and `/ops help <command>`: what this caller may run, and whether approval is needed.
The policy decides (the same ``decide`` the real path uses); this module only renders."""

from __future__ import annotations

from collections.abc import Callable

from bot.config import Config
from bot.domain import Decision, DecisionKind
from bot.messages import plural
from commands.base import Command
from commands.registry import META_USAGE, UNDO_USAGE, commands_of

COMMON = 'Any command takes `--reason "…"` (recorded with the request), `--dry-run` (show the plan, change nothing) ' \
         'and, where the policy allows you, `--break-glass "<reason>"` (run now, reviewed afterwards).'


def _approval_note(decision: Decision) -> str:
    if decision.kind is not DecisionKind.NEEDS_APPROVAL:
        return ""
    each = f", one from each of {', '.join(decision.approvals_each)}" if decision.approvals_each else ""
    return f" _(needs {plural(decision.approvals_required, 'approval')} from {', '.join(decision.approver_roles)}{each})_"


def help_text(decide: Callable[[str], Decision], config: Config | None = None) -> str:
    lines = ["*opsbot commands you can run*"]
    hidden = 0
    for cmd in commands_of(config):
        decision = decide(cmd.name)
        if decision.kind is DecisionKind.DENY:
            hidden += 1
            continue
        lines.append(f"• `{cmd.usage}` — {cmd.summary}{_approval_note(decision)}")
    if len(lines) == 1:
        lines.append("You may not run any command. Ask your platform team to add you to a role in the opsbot policy.")
    if decide("audit").kind is not DecisionKind.DENY:
        lines.append(f"• `{META_USAGE['audit']}` — search the audit trail (answered only to you).")
        lines.append(f"• `{META_USAGE['timeline']}` — what opsbot did or refused, posted here with a verifiable file.")
    lines.append(f"• `{META_USAGE['pending']}` — open requests you may approve.")
    lines.append(f"• `{META_USAGE['cancel']}` — withdraw your own request before it runs.")
    lines.append(f"• `{UNDO_USAGE}` — request the inverse of a request that succeeded (same approvals as typing it).")
    lines.append(f"• `{META_USAGE['help']}` — this list, or one command in detail.")
    lines.append(COMMON)
    if hidden:
        lines.append(f"_{plural(hidden, 'more command')} {'exists' if hidden == 1 else 'exist'} that your roles do not allow._")
    lines.append("_Conditions (size of the change, environment, time window) can ask for more approvals; "
                 "`--dry-run` shows what a given request needs._")
    return "\n".join(lines)


def find(topic: str, config: Config | None = None) -> Command | None:
    words = topic.split()
    for cmd in commands_of(config):
        if words[: len(cmd.words)] == list(cmd.words) or topic == cmd.name:
            return cmd
    return None


# The commands about requests and the record rather than a target: what `/ops help <word>` says of them.
META_HELP = {
    "pending": (META_USAGE["pending"], "Open requests you may approve, each with a link to its card.", None),
    "cancel": (META_USAGE["cancel"], "Withdraw your own request before it runs (also the Cancel button on your pending card).", None),
    "undo": (UNDO_USAGE, "Request the inverse of a request that succeeded (also the Undo button on its card): it is planned, "
                         "decided and approved exactly as if you had typed the inverse command, and refused as stale when "
                         "the target has changed since.", None),
    "audit": (META_USAGE["audit"], "Search the audit trail; answered only to you.", "audit"),
    "timeline": (META_USAGE["timeline"], "Everything opsbot did or refused in a window and channel, posted in the channel "
                                         "with a Markdown file in its thread that `opsbot audit verify --file` checks.", "audit"),
    "help": (META_USAGE["help"], "The commands you may run, or one of them in detail.", None),
}


def command_help(topic: str, decide: Callable[[str], Decision], config: Config | None = None) -> str:
    meta = META_HELP.get(topic.split()[0]) if topic.split() else None
    if meta is not None:
        usage, summary, rule = meta
        allowed = rule is None or decide(rule).kind is not DecisionKind.DENY
        you = "You may run it." if allowed else f":no_entry: You may not run it: {decide(str(rule)).reason}"
        return "\n".join([f"*`{usage}`*", summary, you])
    cmd = find(topic, config)
    if cmd is None:
        names = ", ".join(" ".join(c.words) for c in commands_of(config))
        return f"no command `{topic}`. Commands: {names}."
    decision = decide(cmd.name)
    if decision.kind is DecisionKind.DENY:
        you = f":no_entry: You may not run it: {decision.reason}"
    elif decision.kind is DecisionKind.NEEDS_APPROVAL:
        you = f"You may run it; {_approval_note(decision).strip(' _()')}."
    else:
        you = "You may run it without approval."
    flags = "".join(f" `{f} …`" for f in cmd.flags)
    return "\n".join([f"*`{cmd.usage}`*", cmd.summary, you + (f" Options:{flags}." if flags else ""), COMMON])
