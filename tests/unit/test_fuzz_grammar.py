"""Property-based fuzzing of the command grammar and of what opsbot stores (hypothesis).

Whatever is typed: ``parse`` returns an Invocation or raises a ``UserError`` whose message says
what to do (never another exception, which would be an internal error), numbers it accepts are
plain ASCII, and ``storable`` makes any text something PostgreSQL takes and a person can read.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.config import Config
from bot.errors import UserError
from bot.untrusted import MAX_COMMAND_CHARS, storable
from commands.registry import parse
from tests.conftest import example_config

CFG: Config = example_config("postgresql://x@127.0.0.1/x", "redis://127.0.0.1:1/0", "bull")
WORDS = ["help", "status", "scale", "rollback", "replay", "webhook", "disable", "enable", "provider", "pending", "cancel",
         "audit", "worker", "api", "twilio", "--reason", "--dry-run", "--break-glass", "--to-revision", "--page", "--since",
         "--user", "--command", "--target", "--outcome", "6", "-1", "--1", "0", "20", "99999999999999999999", "６", "٦", "²",
         '"', "'", "“", "”", "—", "=", "wоrker", "r-7kq2m9xa", "<@U0ALICE|alice>", "7d", "2026-11-01",
         "queue", "stats", "failed", "retry", "retry-failed", "pause", "resume", "clean", "billing-webhooks", "--limit",
         "--older-than", "--failed", "--completed", "99y", "100000"]
TRICKY = st.sampled_from(["\x00", "\x1b", "\r", "\u202e", "\u200b", "\ufeff", "\n", "\t", " ", "\ud7ff", "\U0001F600", "\u200d"])
COMMANDS = st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=8), TRICKY), max_size=10).map(" ".join)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(COMMANDS, st.text(max_size=300)))
def test_parse_answers_everything_with_an_invocation_or_a_user_error(text: str) -> None:
    try:
        inv = parse(text, CFG)
    except UserError as exc:
        assert str(exc).strip(), "an error says something"
        return
    for value in inv.params.values():
        if isinstance(value, int):
            assert 0 <= value < 10**9
    assert len(text) <= MAX_COMMAND_CHARS
    assert not any(unicodedata.category(c) == "Cc" and c not in "\t\n" for c in text), "control characters never parse"


@settings(max_examples=300, deadline=None)
@given(value=st.recursive(st.text(max_size=50), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                                           inner, max_size=3)))
def test_storable_output_has_no_hidden_characters(value: object) -> None:
    def walk(v: object) -> None:
        if isinstance(v, str):
            assert "\x00" not in v
            assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") and c not in "\t\n\u200d" for c in v), repr(v)
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(k)
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(storable(value))


@pytest.mark.parametrize("text", ["scale worker 6\x00", "x" * 10_000, "\u202e" * 3])
def test_storable_keeps_what_it_escapes_visible(text: str) -> None:
    out = storable(text)
    assert "\x00" not in out and len(out) <= 4100
    if text.startswith("scale"):
        assert out == "scale worker 6\\x00"
