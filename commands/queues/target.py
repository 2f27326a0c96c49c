"""What every `/ops queue …` command shares: the queue it names, the job ids people type, and how
text read from a queue (job names, failed reasons) is made fit to show in Slack.

A queue is named by its key under ``queues:`` in the config; the plan's ``target_name`` is that
key and its ``target_kind`` is ``queues``, which is what rules' ``targets:`` match.

Jobs are the platforms' data, written by their code, so what opsbot shows of them is treated as
untrusted: control characters made visible, secrets scrubbed (bot/redaction.py), Slack's
``<``/``>``/``&`` escaped so that a failed reason cannot mention ``<!channel>`` or forge a link,
and every string bounded.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from bot.config import Config, Queue
from bot.domain import Plan
from bot.redaction import scrub_text
from bot.untrusted import char_name, storable
from commands.base import Command, Params, age, named

MAX_JOB_ID = 200  # BullMQ's own ids are integers; custom ones are UUIDs and the like
REASON_CHARS = 200


def queue_alias(config: Config, alias: str) -> Queue:
    return named(config.queues, alias, "queue")


def queue_target(q: Queue) -> str:
    return f"queue/{q.environment}/{q.prefix}/{q.name}"


def shown(text: Any, limit: int = REASON_CHARS) -> str:
    """Text read from a queue (or typed), as it may appear in a Slack message: one line, control
    characters as escapes, secrets scrubbed, mrkdwn's special characters escaped, bounded."""
    one_line = " ".join(str(text).split())
    safe = scrub_text(str(storable(one_line, 100_000)))
    if len(safe) > limit:
        safe = safe[:limit] + "…"
    return safe.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")


def now_ms() -> int:
    return round(time.time() * 1000)


def ms_age(ms: int | None, now: int | None = None) -> str:
    """A job time (ms since the epoch) as an age: ``3h``."""
    if not ms:
        return "?"
    return age(datetime.fromtimestamp(ms / 1000, UTC).isoformat(), datetime.fromtimestamp((now or now_ms()) / 1000, UTC))


def ms_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def look_alike_warning(job_id: str) -> str:
    odd = sorted({c for c in job_id if ord(c) > 127})
    if not odd:
        return ""
    return (f":warning: the job id contains {', '.join(char_name(c) for c in odd[:3])}: check that it is the job you mean, "
            "not one whose id only looks the same")


def id_list(ids: list[str], shown_count: int = 10) -> str:
    """``a``, ``b``, … and 5 more."""
    head = ", ".join(f"`{shown(i, 80)}`" for i in ids[:shown_count])
    return head + (f" and {len(ids) - shown_count} more" if len(ids) > shown_count else "")


class QueueCommand(Command):
    backend = "Redis"

    def queue_arg(self, args: list[str], config: Config, names: list[str]) -> Queue:
        self.expect_args(args, names)
        return queue_alias(config, args[0])

    def job_id_arg(self, value: str) -> str:
        # Control and formatting characters never get this far (bot/untrusted.py refuses them
        # in the whole command); what is left to refuse is what no job id looks like.
        if len(value) > MAX_JOB_ID or not value.isprintable():
            raise self.usage_error(f"that does not look like a job id (at most {MAX_JOB_ID} printable characters).")
        return value

    def limit_flag(self, flags: dict[str, Any], *, default: int, most: int) -> int:
        limit = int(flags.get("--limit", default))
        if not 1 <= limit <= most:
            raise self.usage_error(f"`--limit` takes 1 to {most:,}, got {limit:,}. Try `--limit {min(max(limit, 1), most)}`.")
        return limit

    def queue_plan(self, params: Params, q: Queue, **fields: Any) -> Plan:
        alias = str(params["queue"])
        label = f"queue {alias}" + (f" ({q.name})" if q.name != alias else "")
        return Plan(command=self.name, target=queue_target(q), target_label=label, environment=q.environment, params=params,
                    mutating=self.mutating, target_name=alias, target_kind="queues", **fields)

    def locate(self, params: Params, config: Config) -> Plan | None:
        q = config.queues.get(str(params.get("queue", "")))
        if q is None:
            return None
        return self.queue_plan(params, q, summary=f"{' '.join(self.words)} {params['queue']} (not read)")

