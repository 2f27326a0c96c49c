"""Text read from a platform (a running query, a health body, a Redis key), made fit to show in chat.

Such text is nobody's promise: it can hold secrets, be huge, span lines, or carry Slack markup
(``<!channel>``, ``<@U…>``, backticks that end a code span). ``untrusted`` scrubs secret-shaped parts
(bot/redaction.py) before cutting, so that a cut never leaves half a secret unrecognised, puts it on
one line, bounds it, and escapes ``&``, ``<`` and ``>`` as Slack asks, so that it is shown, never acted on.
"""

from __future__ import annotations

import re

from bot.redaction import scrub_text

_SPACE = re.compile(r"\s+")


def slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def one_line(text: str, limit: int) -> str:
    """``text`` scrubbed, on one line, at most ``limit`` characters (… when cut), backticks turned into
    quotes so that it can sit in a code span — not Slack-escaped: for a mutating plan's summary and
    details and an Outcome's message, which the card, the dry-run answer and the thread escape when
    they render them (bot/messages.py ``mrkdwn``); escaping here too would show ``&lt;``."""
    line = _SPACE.sub(" ", scrub_text(text)).strip().replace("`", "'")
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return line


def untrusted(text: str, limit: int) -> str:
    """``one_line``, Slack-escaped: for a read-only command's answer, which is sent as it is."""
    return slack_escape(one_line(text, limit))


def span(seconds: float | None) -> str:
    """``125.4`` → ``2m 05s``; ``0.25`` → ``0.3s``; ``None`` → ``?``."""
    if seconds is None:
        return "?"
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"
