"""Text that comes from people and from payloads: what opsbot accepts, and how it keeps it.

Two rules, applied at the two places untrusted text crosses a boundary:

* **Accepting a command** (``check_command_text``, ``whole_number``): a command is at most
  ``MAX_COMMAND_CHARS`` long, has no control characters and no invisible formatting characters
  (NUL, escape sequences, bidi overrides, zero-width spaces: each can hide what a command really
  says, in the card an approver reads and in the audit trail), and numbers are written with the
  ASCII digits 0-9 only (``int("٦")`` is 6 in Python; an approver reading the card would not expect
  that). Each refusal names the character and says what to type instead.
* **Storing a record** (``storable``): whatever an attempt contained is kept in the audit trail, made
  storable: control and formatting characters are written as visible escapes (``\\x00``,
  ``\\u202e``), never dropped silently (PostgreSQL refuses NUL in text; a dropped character would
  make the record say something the person did not type), and strings are bounded.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

MAX_COMMAND_CHARS = 2000  # far more than any real command; a longer --reason belongs in the incident doc
MAX_STORED_CHARS = 4000  # per string in an audit row
_ALLOWED_CONTROLS = {"\t", "\n"}
_ALLOWED_FORMAT = {"\u200d"}  # zero-width joiner: part of emoji sequences people put in a --reason
_ASCII_INT = re.compile(r"[0-9]{1,9}")


_CONTROL_NAMES = {0x00: "NULL", 0x07: "BELL", 0x08: "BACKSPACE", 0x0B: "LINE TABULATION", 0x0C: "FORM FEED",
                  0x0D: "CARRIAGE RETURN", 0x1B: "ESCAPE", 0x7F: "DELETE"}


def char_name(c: str) -> str:
    """``U+0000 NULL``, ``U+FF16 FULLWIDTH DIGIT SIX``."""
    fallback = _CONTROL_NAMES.get(ord(c), "control character" if unicodedata.category(c) == "Cc" else "unnamed character")
    return f"U+{ord(c):04X} {unicodedata.name(c, fallback)}"


def _hidden(c: str) -> bool:
    cat = unicodedata.category(c)
    return (cat == "Cc" and c not in _ALLOWED_CONTROLS) or (cat == "Cf" and c not in _ALLOWED_FORMAT) or cat in ("Cs", "Co", "Cn")


def check_command_text(text: str) -> str | None:
    """None if ``text`` may be parsed, else why not (a sentence for the person who typed it)."""
    if len(text) > MAX_COMMAND_CHARS:
        return (f"the command is {len(text):,} characters long; opsbot reads at most {MAX_COMMAND_CHARS:,}. "
                "Shorten it (a long `--reason` belongs in the incident doc; put its link here).")
    for i, c in enumerate(text):
        if _hidden(c):
            return (f"the command contains an invisible character ({char_name(c)}) at position {i + 1}; "
                    "retype it without that character (pasting from a terminal or a document can bring these in).")
    return None


def non_ascii_hint(word: str) -> str:
    """For a name that was not found: point at look-alike letters (`wоrker` with a Cyrillic о)."""
    odd = sorted({c for c in word if ord(c) > 127})
    if not odd:
        return ""
    return " (`" + word + "` contains " + ", ".join(char_name(c) for c in odd[:3]) + ": type it with plain ASCII letters)"


def whole_number(value: str) -> int | None:
    """``value`` as a non-negative int if it is written with 1 to 9 ASCII digits; else None.
    Callers turn None into their own usage error (see ``number_problem``)."""
    return int(value) if _ASCII_INT.fullmatch(value) else None


def number_problem(value: str, what: str) -> str:
    """Why ``value`` is not accepted as ``what`` (call when ``whole_number`` returned None)."""
    if value and all(c.isdigit() for c in value):
        if any(ord(c) > 127 for c in value):
            ascii_form = "".join(str(unicodedata.digit(c, 0)) for c in value)
            odd = next(c for c in value if ord(c) > 127)
            return f"{what} must be written with the digits 0-9; `{value}` uses {char_name(odd)}. Type `{ascii_form}`."
        return f"{what} `{value}` is too large."
    shown = value if len(value) <= 40 else value[:40] + "…"
    return f"{what} must be a whole number written with the digits 0-9, got `{shown}`."


def storable(value: Any, limit: int = MAX_STORED_CHARS) -> Any:
    """A copy of ``value`` (str, or dicts/lists of them) that PostgreSQL will store and a person can
    read: control and formatting characters as visible escapes, each string at most ``limit``."""
    if isinstance(value, str):
        if any(_hidden(c) or c == "\r" for c in value):
            value = "".join(_escape(c) if (_hidden(c) or c == "\r") else c for c in value)
        if len(value) > limit:
            value = value[:limit] + f"… [{len(value) - limit:,} more characters not kept]"
        return value
    if isinstance(value, dict):
        return {storable(k, 200): storable(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v, limit) for v in value]
    return value


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def check_free_text(text: str, *, what: str, limit: int) -> str | None:
    """None if ``text`` (a reason typed in a dialog) may be kept and shown, else why not, for the
    person: not empty, at most ``limit`` characters, no control or invisible formatting characters
    (line breaks and tabs are fine). Mentions and links are not refused: they are shown inert
    (``bot.messages.mrkdwn``)."""
    if not text.strip():
        return f"{what} is empty; say in a few words why."
    if len(text) > limit:
        return f"{what} is {len(text):,} characters long; at most {limit:,}. Shorten it (put a link to the longer story)."
    for i, c in enumerate(text):
        if _hidden(c) or c == "\r":
            return (f"{what} contains an invisible character ({char_name(c)}) at position {i + 1}; "
                    "retype it without that character.")
    return None
