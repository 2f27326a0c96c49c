"""Secrets out of text that opsbot shows people: log lines, query texts, HTTP response excerpts.

The audit trail already drops the values of secret-named keys and the bot's own secrets (bot/audit.py).
Text read from a platform — a pod's log, a running query — can hold anybody's secrets, which opsbot
cannot know, so it is also scrubbed by shape: what follows a secret-named key (``password=…``,
``"api_key": "…"``), bearer/basic credentials, the password in a URL, and token formats that are
unambiguous (Slack ``xox?-``, GitHub ``ghp_``, AWS access key ids, JWTs, PEM private keys). It is a
safety net, not a guarantee: a secret with no recognisable shape passes, which is why logs stay
behind a policy rule.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

_KEY = (r"(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|client[_-]?secret"
        r"|authorization|auth|credentials?|session[_-]?id|cookie)")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), REDACTED),
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {REDACTED}"),
    # key=value, key: value, "key": "value" (the key kept, the value gone)
    # (a value already redacted is left alone, so that scrubbing twice changes nothing)
    (re.compile(rf"""(?i)(["']?[\w.-]*{_KEY}[\w.-]*["']?\s*[:=]\s*)(?!\[redacted\])(?:"[^"]*"|'[^']*'|[^\s,;&}}\]]+)"""),
     rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@"), rf"\1{REDACTED}@"),
    (re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{8,}"), REDACTED),
    (re.compile(r"\bxapp-[A-Za-z0-9-]{8,}"), REDACTED),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), REDACTED),
    (re.compile(r"\bsk_(?:live|test)_[A-Za-z0-9]{10,}"), REDACTED),
)


def scrub_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with known ``secrets`` (exact values, longest first) and secret-shaped parts replaced."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
