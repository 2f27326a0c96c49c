"""The audit trail: every step of every request, appended to PostgreSQL through ``Audit.record``
(the one function every stage calls) and posted to the audit channel.

The database row is the record: it is written first, hash-chained (see ``store.append_audit`` and
``store.verify_chain``), and the posting to Slack is best effort: a Slack outage never loses a
record, it only delays its copy in the channel. (The outbox that retries those posts is issue #4.)
"""

from __future__ import annotations

import logging
from typing import Any

from bot.adapters.store import Store
from bot.domain import Actor
from bot.messages import audit_line
from bot.ports import Chat

log = logging.getLogger(__name__)

# Keys never written to the audit trail, wherever they appear in a plan or result.
_SECRET_KEYS = ("token", "secret", "password", "authorization", "url", "dsn")


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "[redacted]" if any(s in k.lower() for s in _SECRET_KEYS) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class Audit:
    def __init__(self, store: Store, chat: Chat, audit_channel: str | None) -> None:
        self.store, self.chat, self.audit_channel = store, chat, audit_channel

    async def record(self, event: str, *, actor: Actor, channel_id: str = "", request_id: str | None = None,
                     text: str = "", plan: dict[str, Any] | None = None, result: dict[str, Any] | None = None,
                     post: bool = True) -> dict[str, Any]:
        row = await self.store.append_audit(event=event, actor=actor, channel_id=channel_id, request_id=request_id,
                                            command_text=text, plan=redact(plan), result=redact(result))
        if post and self.audit_channel:
            try:
                await self.chat.post_audit(channel_id=self.audit_channel, text=audit_line(row))
            except Exception:  # the row is safe in PostgreSQL; the channel copy is best effort
                log.exception("could not post audit row %s to the audit channel", row["seq"])
        return row
